"""The iterative run on the tiny model: artifacts of every stage, the manifest, and a driver killed
(SIGKILL) during iteration 1's scoring and again during its training, resumed to the same selections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from iterit.rundir import read_scores


def _selections(run_dir: Path) -> dict:
    out = {}
    for e in range(2):
        picks = [json.loads(line) for line in open(run_dir / f"iter_{e}" / "selection.jsonl")]
        order = pq.read_table(run_dir / f"iter_{e}" / "order.parquet").to_pydict()
        out[e] = ([p["id"] for p in picks], order["id"], order["status"])
    return out


def test_run_writes_every_artifact(uninterrupted):
    from transformers import AutoModelForCausalLM

    run_dir, out = uninterrupted
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    assert list(stages) == [
        "ingest",
        "iter_0/score",
        "iter_0/select",
        "iter_0/train",
        "iter_1/score",
        "iter_1/select",
        "iter_1/train",
        "report",
    ]
    assert all(s["status"] == "done" and s["seconds"] >= 0 for s in stages.values())
    assert manifest["seed"] == 7 and manifest["versions"]["torch"]
    assert (stages["ingest"]["result"]["accepted"], stages["ingest"]["result"]["rejected"]) == (60, 1)
    # iteration 0 scores all 60, iteration 1 re-scores the window W = 6 x 2 = 12
    assert stages["iter_0/score"]["result"]["rows"] == 60 and stages["iter_1/score"]["result"]["rows"] == 12
    sel = _selections(run_dir)
    for e in range(2):
        picks, order, status = sel[e]
        assert len(picks) == 6 and order[:6] == picks and status[:6] == ["selected"] * 6
        assert sorted(order) == sorted(f"q{i}" for i in range(60))  # the full order, every id once
    assert status.count("tail") == 48  # iteration 1 left the tail as it was
    assert sel[1][1][12:] == sel[0][1][12:]
    assert set(sel[1][1][:12]) == set(sel[0][1][:12])
    # training: one continuous step count and schedule over both iterations
    metrics = [
        json.loads(line) for e in range(2) for line in open(run_dir / f"iter_{e}" / "train_metrics.jsonl")
    ]
    assert [m["step"] for m in metrics] == list(range(1, 7)) and {m["iteration"] for m in metrics} == {0, 1}
    assert stages["iter_1/train"]["result"]["total_steps"] == 6
    # keep_checkpoints: last: iteration 0's checkpoint went once iteration 1 had trained from it
    assert not os.path.exists(stages["iter_0/train"]["result"]["checkpoint"])
    assert os.path.isdir(stages["iter_1/train"]["result"]["checkpoint"])
    for e in range(2):
        AutoModelForCausalLM.from_pretrained(run_dir / "model" / f"iter_{e}")
    assert (run_dir / "report" / "report.md").exists() and out["report"].endswith("report.md")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 7


def test_run_mirrors_its_numbers_to_tensorboard(uninterrupted):
    from test_tracking import read_scalars

    run_dir, _ = uninterrupted
    scalars = read_scalars(run_dir / "tensorboard")
    metrics = [
        json.loads(line) for e in range(2) for line in open(run_dir / f"iter_{e}" / "train_metrics.jsonl")
    ]
    # rank 0 of every fit: one point per optimizer step, on the global step that runs across iterations
    assert scalars["train/loss"] == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics]
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, 7))
    # the driver: one point per iteration for each stage's result
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert scalars["score/scored"] == [
        (e, float(stages[f"iter_{e}/score"]["result"]["scored"])) for e in range(2)
    ]
    assert scalars["select/mean_ifd_selected"] == [
        (e, pytest.approx(stages[f"iter_{e}/select"]["result"]["mean_ifd_selected"], rel=1e-6))
        for e in range(2)
    ]


def test_a_run_directory_is_not_overwritten(uninterrupted, tiny_run_config, loop_corpus):
    from iterit.config import config_from_dict
    from iterit.errors import IteritError
    from iterit.loop import run

    run_dir, _ = uninterrupted
    with pytest.raises(IteritError, match="--resume"):
        run(config_from_dict(tiny_run_config(loop_corpus, run_dir)), log=lambda *_: None)


def _driver(args: list[str], address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "iterit", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _kill_when_running(
    proc: subprocess.Popen, manifest: Path, stage: str, delay: float, timeout: float = 240
) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before {stage} started")
        try:
            rec = json.loads(manifest.read_text())["stages"].get(stage)
        except (FileNotFoundError, json.JSONDecodeError):
            rec = None
        if rec and rec["status"] == "running":
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{stage} did not start within {timeout} s")


def test_killed_driver_resumes_to_the_same_selections(
    uninterrupted, ray_local, tiny_run_config, loop_corpus, tmp_path
):
    from iterit.loop import run

    address = ray_local.get_runtime_context().gcs_address
    run_dir = tmp_path / "run"
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_run_config(loop_corpus, run_dir)))
    manifest = run_dir / "manifest.json"

    _kill_when_running(_driver(["run", str(cfg_path)], address), manifest, "iter_1/score", delay=1.0)
    stages = json.loads(manifest.read_text())["stages"]
    assert stages["iter_0/train"]["status"] == "done" and stages["iter_1/score"]["status"] == "running"

    _kill_when_running(
        _driver(["run", "--resume", str(run_dir)], address), manifest, "iter_1/train", delay=4.0
    )
    stages = json.loads(manifest.read_text())["stages"]
    assert stages["iter_1/score"]["status"] == "done" and stages["iter_1/train"]["status"] == "running"
    first_finished = {k: v["finished"] for k, v in stages.items() if v["status"] == "done"}

    said = []
    run(resume=str(run_dir), log=said.append)
    stages = json.loads(manifest.read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values())
    # the killed driver's lock was taken over (its process is gone), and released at the end
    assert [line for line in said if line.startswith("[lock] took over")], said[:5]
    assert not (run_dir / "lock.json").exists()
    # finished stages were not redone
    assert all(stages[k]["finished"] == t for k, t in first_finished.items())
    assert _selections(run_dir) == _selections(uninterrupted[0])
    steps = [
        json.loads(line)["step"]
        for e in range(2)
        for line in open(run_dir / f"iter_{e}" / "train_metrics.jsonl")
    ]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("method", ["random", "longest"])
def test_methods_that_ignore_scores_keep_iteration_0s_for_the_window(method, tmp_path):
    """random and longest order a window without reading its IFD: a later iteration takes iteration 0's
    rows of the window and runs no model (there is none here to run)."""
    import numpy as np
    import pyarrow as pa

    from iterit.config import config_from_dict
    from iterit.loop import score_stage, select_stage
    from iterit.rundir import RunDir

    run_dir = tmp_path / "run"
    ids = [f"s{i}" for i in range(12)]
    (run_dir / "ingest").mkdir(parents=True)
    (run_dir / "iter_0").mkdir()
    messages = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a " * (i + 1)}]
        for i in range(12)
    ]
    pq.write_table(pa.table({"id": ids, "messages": messages}), run_dir / "ingest" / "samples.parquet")
    scores = pa.table(
        {
            "id": ids,
            "ifd": np.linspace(0.5, 0.95, 12),
            "loss_cond": np.ones(12),
            "loss_prior": np.ones(12),
            "n_prompt_tokens": pa.array([3] * 12, pa.int32()),
            "n_response_tokens": pa.array(range(1, 13), pa.int32()),
        }
    )
    pq.write_table(scores, run_dir / "iter_0" / "scores.parquet")
    cfg = config_from_dict(
        {
            "base_model": str(tmp_path / "no-model"),
            "datasets": [{"path": "unused"}],
            "output_dir": str(run_dir),
            "selection": {"method": method, "ratio": 2, "update_ratio": 2},
        }
    )
    samples = str(run_dir / "ingest" / "samples.parquet")
    select_stage(cfg, RunDir(str(run_dir)), 0, samples, eos=None)
    window = pq.read_table(run_dir / "iter_0" / "order.parquet").column("id").to_pylist()[:4]

    summary = score_stage(cfg, RunDir(str(run_dir)), 1, samples, log=lambda *_: None)
    assert summary["reused_from"] == "iter_0" and (summary["scored"], summary["tokens"]) == (4, 0)
    kept = read_scores(str(run_dir / "iter_1" / "scores"))
    assert sorted(kept.column("id").to_pylist()) == sorted(window)
    want = {r["id"]: r for r in scores.to_pylist()}
    assert all(r == want[r["id"]] for r in kept.to_pylist())  # iteration 0's rows, unchanged
    assert json.loads((run_dir / "iter_1" / "score_summary.json").read_text()) == summary
    sel = select_stage(cfg, RunDir(str(run_dir)), 1, samples, eos=None)
    assert sel["k"] == 2 and sel["window"] == 4


def test_methods_that_read_scores_rescore_with_the_last_model(tmp_path):
    from iterit.config import config_from_dict
    from iterit.errors import IteritError
    from iterit.loop import score_stage
    from iterit.rundir import RunDir

    run_dir = tmp_path / "run"
    (run_dir / "iter_0").mkdir(parents=True)
    (run_dir / "ingest").mkdir()
    import pyarrow as pa

    pq.write_table(
        pa.table({"id": ["a", "b"], "messages": [[{"role": "assistant", "content": "x"}]] * 2}),
        run_dir / "ingest" / "samples.parquet",
    )
    pq.write_table(pa.table({"id": ["a", "b"], "position": [0, 1]}), run_dir / "iter_0" / "order.parquet")
    cfg = config_from_dict(
        {
            "base_model": "unused",
            "datasets": [{"path": "unused"}],
            "output_dir": str(run_dir),
            "selection": {"method": "iterit", "ratio": 1},
        }
    )
    with pytest.raises(IteritError, match="iter_0 is missing or incomplete"):
        score_stage(cfg, RunDir(str(run_dir)), 1, str(run_dir / "ingest" / "samples.parquet"), log=print)


def test_prune_checkpoint_removes_only_a_superseded_directory(tmp_path):
    from iterit.loop import prune_checkpoint

    old, new = tmp_path / "fit0" / "checkpoint_a", tmp_path / "fit1" / "checkpoint_b"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "state.pt").write_bytes(b"x" * 10)
    said = []
    prune_checkpoint(str(new), keep=str(new), log=said.append)  # the one still needed
    prune_checkpoint(None, keep=str(new), log=said.append)
    assert new.exists() and not said
    prune_checkpoint(str(old), keep=str(new), log=said.append)
    assert not old.exists() and new.exists() and len(said) == 1 and "keep_checkpoints: all" in said[0]
    prune_checkpoint(str(old), keep=str(new), log=said.append)  # already gone: nothing to do
    assert len(said) == 1


def test_damaged_files_of_done_stages_are_named_and_redone_on_resume(uninterrupted, ray_local, tmp_path):
    """A finished run whose files were damaged afterwards (a cut selection.jsonl, a scores part without
    its footer): `--resume` names each in one line, runs those stages again, and ends with the
    uninterrupted run's selections and every id once in the scores."""
    import shutil

    from iterit.loop import run
    from iterit.rundir import iter_scores, score_parts

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    picks = run_dir / "iter_0" / "selection.jsonl"
    picks.write_bytes(picks.read_bytes()[: picks.stat().st_size // 2])
    part = Path(score_parts(str(run_dir / "iter_1" / "scores"))[0])
    part.write_bytes(part.read_bytes()[:-20])
    said = []
    run(resume=str(run_dir), log=said.append)
    redone = [line for line in said if "done earlier, but" in line]
    assert len(redone) == 2, said
    assert redone[0].startswith(f"[iter_0/select] done earlier, but {picks} ")
    assert redone[1].startswith(f"[iter_1/score] done earlier, but {part}: damaged (")
    assert "[iter_1/select] done earlier, skipped" in said and "[iter_0/score] done earlier, skipped" in said
    assert _selections(run_dir) == _selections(uninterrupted[0])
    ids = [
        i for t in iter_scores(str(run_dir / "iter_1" / "scores"), ["id"], False) for i in t["id"].to_pylist()
    ]
    original = [
        i
        for t in iter_scores(str(uninterrupted[0] / "iter_1" / "scores"), ["id"], False)
        for i in t["id"].to_pylist()
    ]
    assert sorted(ids) == sorted(original) and len(ids) == len(set(ids))


def test_a_full_disk_stops_the_stage_with_one_line_and_a_resume_finishes_it(
    uninterrupted, ray_local, tmp_path, monkeypatch
):
    """ENOSPC injected into the order's write (iter_1/select run again): the stage fails with one line
    naming the file and the free space, leaves no temporary file, and a resume once space is back ends
    with the uninterrupted run's selections."""
    import errno
    import shutil

    import iterit.rundir
    from iterit.errors import IteritError
    from iterit.loop import run

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["stages"]["iter_1/select"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    def full(table, where, **_):
        where.write(b"PAR1")  # a few bytes made it before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(iterit.rundir.pq, "write_table", full)
        with pytest.raises(IteritError) as e:
            run(resume=str(run_dir), log=lambda *_: None)
    line = str(e.value)
    assert (
        line.startswith(f"{run_dir}/iter_1/order.parquet: no space left on the device (")
        and "GiB free" in line
    )
    assert "\n" not in line and "--resume" in line
    assert (
        json.loads((run_dir / "manifest.json").read_text())["stages"]["iter_1/select"]["status"] == "failed"
    )
    assert not list(run_dir.rglob("*.tmp-*"))
    run(resume=str(run_dir), log=lambda *_: None)
    assert _selections(run_dir) == _selections(uninterrupted[0])
