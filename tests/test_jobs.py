"""`ray job submit` end to end: a separate local Ray started with `ray start --head`, the whole loop
on the tiny model submitted as a job through ray_jobs/run.py (working_dir = this repository), waited
for SUCCEEDED, its artifacts checked, and that Ray stopped. The session's own Ray (ray_local) is a
different instance: this one has its own ports and temp dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import WORDS

ROOT = Path(__file__).parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on free ports with its own temp dir; `ray stop` at the end."""
    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp = tempfile.mkdtemp(prefix="iterit-rj-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                       capture_output=True, timeout=120)


def test_ray_job_submit_runs_the_loop(head, tiny_model_dir, tmp_path):
    address, env = head
    import random

    rng = random.Random(11)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({
        "id": f"j{i}", "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))),
        "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))}) + "\n" for i in range(30)))
    run_dir = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": tiny_model_dir, "datasets": [{"path": str(corpus)}], "output_dir": str(run_dir),
        "sequence_len": 64, "iterations": 2, "selection": {"ratio": 4, "update_ratio": 2},
        "scoring": {"torch_threads": 1, "batch_size": 16},
        "ray_num_workers": 1, "deepspeed": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
        "resources_per_worker": {"CPU": 1},
    }))
    runtime_env = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}
    # `ray job submit` waits for the job and exits non-zero unless it SUCCEEDED.
    job = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--submission-id", "iterit-test-job",
         "--", "python", "ray_jobs/run.py", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
    assert "Job 'iterit-test-job' succeeded" in job.stdout + job.stderr
    status = subprocess.run([RAY, "job", "status", "--address", address, "iterit-test-job"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "SUCCEEDED" in status.stdout + status.stderr
    # The job's driver printed the loop's summary table, and wrote every artifact.
    assert f"run: {run_dir}" in job.stdout
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values()) and "iter_1/train" in stages
    for e in range(2):
        assert len((run_dir / f"iter_{e}" / "selection.jsonl").read_text().splitlines()) == 4
        assert (run_dir / "model" / f"iter_{e}" / "iterit_export.json").exists()
    assert (run_dir / "report" / "report.md").exists()


def test_run_entrypoint_maps_config_to_the_run_command():
    sys.path.insert(0, str(ROOT / "ray_jobs"))
    try:
        from run import cli_args
    finally:
        sys.path.pop(0)
    assert cli_args(["--config", "c.yaml", "--set", "seed=1"]) == ["run", "c.yaml", "--set", "seed=1"]
    assert cli_args(["--resume", "s3://b/run"]) == ["run", "--resume", "s3://b/run"]
