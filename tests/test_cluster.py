"""cluster.yaml is checked against Ray's own autoscaler schema, after Ray fills in its defaults."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # raises jsonschema.ValidationError on a bad key or type
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpus = {name: n["resources"].get("GPU", 0) for name, n in nodes.items()}
    assert sorted(gpus.values()) == [0, 1, 8]
    assert all(
        n.get("min_workers", 0) == 0 and n.get("max_workers", 0) >= 1
        for name, n in nodes.items()
        if gpus[name]
    )
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and "-gpu" in image and "ray-ml" not in image
    assert any("pip install" in c and "/home/ray/iterit" in c for c in config["setup_commands"])


def test_a_wrong_key_fails_the_schema():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_1x"]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_ray_datas_console_is_quiet_and_its_log_file_keeps_everything(ray_local):
    """The quiet console: Ray Data's INFO lines (its progress on a job log) leave the console, its own
    session file still takes them, and its progress bars are off."""
    import logging

    from ray.data import DataContext

    from iterit.cluster import _quiet_ray_data

    logger = logging.getLogger("ray.data")
    ctx = DataContext.get_current()
    before = [(h, h.level) for h in logger.handlers], ctx.enable_progress_bars
    try:
        _quiet_ray_data()
        console = [h for h in logger.handlers if "File" not in type(h).__name__]
        files = [h for h in logger.handlers if "File" in type(h).__name__]
        assert console and files
        assert all(h.level == logging.ERROR for h in console) and all(h.level < logging.INFO for h in files)
        assert ctx.enable_progress_bars is False
    finally:
        for h, level in before[0]:
            h.setLevel(level)
        ctx.enable_progress_bars = before[1]


def test_a_runs_first_line_names_rays_logs_and_links_them(tmp_path, monkeypatch):
    from iterit import cluster

    logs = tmp_path / "session_x" / "logs"
    logs.mkdir(parents=True)
    monkeypatch.setattr(cluster, "RAY_LOGS", str(logs))
    monkeypatch.setattr(cluster, "_started_here", True)
    monkeypatch.delenv(cluster.VERBOSE_ENV, raising=False)
    line = cluster.logs_line(str(tmp_path / "run"))
    assert (tmp_path / "run" / "logs" / "ray").resolve() == logs.resolve()
    assert str(tmp_path / "run" / "logs" / "ray") in line and "`iterit --verbose` prints it here" in line
    assert cluster.logs_line(str(tmp_path / "run")) == line  # a resumed run: the link replaced
    monkeypatch.setattr(cluster, "_started_here", False)
    assert "on the head node" in cluster.logs_line("s3://bucket/run")
    monkeypatch.setenv(cluster.VERBOSE_ENV, "1")
    assert "--verbose" in cluster.logs_line("s3://bucket/run") and cluster.verbose()


def test_verbose_is_a_global_flag(tmp_path, monkeypatch):
    from iterit.cli import main
    from iterit.cluster import VERBOSE_ENV

    monkeypatch.setenv(VERBOSE_ENV, "")  # put back as it was after the test
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base_model": "m", "datasets": [{"path": "d.jsonl"}]}))
    try:
        main(["--verbose", "config", str(path)])
    except SystemExit as e:
        assert e.code == 0
    import os

    assert os.environ[VERBOSE_ENV] == "1"


def test_live_progress_counts_what_the_workers_write(tmp_path):
    """Off a terminal the view is plain lines: scored rows from the parts' footers (a resumed stage's
    earlier parts count as done), training steps and the last loss from the metrics file."""
    import json
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterit.progress import scoring_progress, training_progress

    scores = tmp_path / "scores"
    scores.mkdir()
    part = pa.table({"id": ["a", "b"], "n_prompt_tokens": [3, 4], "n_response_tokens": [5, 6]})
    pq.write_table(part, scores / "earlier.parquet")  # a resumed stage's first attempt
    lines = []
    with scoring_progress(str(scores), 5, every=0.05, line_every=0, log=lines.append):
        time.sleep(0.3)
        pq.write_table(pa.table({"id": ["c", "d", "e"], "n_prompt_tokens": [1, 1, 1], "n_response_tokens": [1, 1, 1]}), scores / "p1.parquet")  # fmt: skip
        time.sleep(0.3)
    assert lines[0].startswith("  scoring: 2/5 samples") and lines[-1].startswith("  scoring: 5/5 samples")
    assert "tokens/s" in lines[-1] and not any("\r" in line for line in lines)

    metrics = tmp_path / "train_metrics.jsonl"
    lines = []
    with training_progress(str(metrics), 4, every=0.05, line_every=0, log=lines.append):
        time.sleep(0.2)
        metrics.write_text("".join(json.dumps({"step": s, "loss": 2.0 - s / 10, "tokens": 100, "seconds": 0.5}) + "\n" for s in (1, 2, 3)))  # fmt: skip
        time.sleep(0.3)
    assert lines[0].startswith("  training: 0/4 steps") and lines[-1].startswith("  training: 3/4 steps")
    assert "loss 1.7000, 200 tokens/s" in lines[-1]
