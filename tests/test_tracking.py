"""Experiment tracking: what each tracker receives. TensorBoard for real (tensorboardX event files, read
back record by record); MLflow and W&B through stand-in modules that record their calls, since the
real clients are optional and talk to servers."""

from __future__ import annotations

import struct
import sys
import types
from pathlib import Path

import pytest

from iterit.errors import IteritError
from iterit.tracking import Tracker, check_available, run_key


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under logdir: tag -> [(step, value)], in file order."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_writes_event_files(tmp_path):
    t = Tracker("tensorboard", str(tmp_path))
    t.log({"train/loss": 2.5, "train/lr": 1e-4, "skipped": None}, 1)
    t.log({"train/loss": 2.0}, 2)
    t.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["train/lr"] == [(1, pytest.approx(1e-4))] and "skipped" not in scalars


def test_off_logs_nothing(tmp_path):
    t = Tracker(None, str(tmp_path))
    t.log({"train/loss": 1.0}, 1)
    t.close()
    assert list(tmp_path.iterdir()) == []


class Recorder(types.ModuleType):
    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def call(*args, **kwargs):
            self.calls.append((attr, args, kwargs))
            return [] if attr == "search_runs" else None

        return call


def test_mlflow_one_run_per_iterit_run(tmp_path, monkeypatch):
    fake = Recorder("mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    t = Tracker("mlflow", str(tmp_path / "run"), {"seed": 7, "selection": {"ratio": 0.05}})
    t.log({"train/loss": 1.5}, 3)
    t.close()
    names = [c[0] for c in fake.calls]
    assert names == ["set_experiment", "search_runs", "start_run", "log_params", "log_metrics", "end_run"]
    start = fake.calls[2][2]
    assert start["run_name"] == "run" and start["tags"] == {"iterit_run": run_key(str(tmp_path / "run"))}
    assert fake.calls[3][1][0] == {"seed": "7", "selection.ratio": "0.05"}
    assert fake.calls[4][1][0] == {"train_loss": 1.5} and fake.calls[4][2] == {"step": 3}


def test_wandb_points_carry_their_own_axis(tmp_path, monkeypatch):
    fake = Recorder("wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    t = Tracker("wandb", str(tmp_path / "run"))
    t.log({"train/loss": 1.5}, 3)
    t.log({"score/scored": 60}, 1, axis="iteration")
    t.close()
    init = fake.calls[0][2]
    assert init["id"] == run_key(str(tmp_path / "run")) and init["resume"] == "allow"
    assert fake.calls[1][1][0] == {"train/loss": 1.5, "step": 3}
    assert fake.calls[2][1][0] == {"score/scored": 60.0, "iteration": 1}
    assert fake.calls[3][0] == "finish"


def test_run_key_is_the_same_for_relative_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        run_key("runs/x")
        == run_key(str(tmp_path / "runs" / "x"))
        == run_key(str(tmp_path / "runs" / "x") + "/")
    )
    assert run_key("s3://b/runs/x") != run_key("s3://b/runs/y")


def test_missing_package_fails_before_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(IteritError, match="pip install wandb"):
        check_available("wandb")
    check_available(None)
    check_available("tensorboard")
