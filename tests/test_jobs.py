"""`ray job submit` end to end: a separate local Ray started with `ray start --head`, the whole loop
on the tiny model submitted as a job through ray_jobs/run.py (working_dir = this repository), waited
for SUCCEEDED, its artifacts checked, and that Ray stopped. The session's own Ray (ray_local) is a
different instance: this one has its own ports and temp dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
    """`ray start --head --block` on free ports with its own temp dir, stopped at the end.

    Not `ray stop`: it stops every Ray on the machine, the session's own included, and a driver
    whose raylet dies exits (pytest with it). This head's processes are stopped by process group
    and by their temp dir, which every process of that Ray names on its command line."""
    import psutil

    # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
    temp = tempfile.mkdtemp(prefix="iterit-rj-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Every fixed default port of a Ray node moved too: the session's own Ray (ray_local) already
    # holds them, and a dashboard agent that cannot bind never registers ("No available agent").
    agent_ports = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            *agent_ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while (
            subprocess.run(
                [RAY, "job", "list", "--address", address], env=env, capture_output=True, timeout=60
            ).returncode
            != 0
        ):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the head's job server did not come up in 120 s"
            time.sleep(1)
        yield address, env
    finally:
        # SIGKILL at once, as the multi-node fixture does: the job has ended, and `ray start`'s own
        # graceful stop on SIGTERM took the full 30 s it was given.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(temp in arg for arg in p.info["cmdline"] or ()):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


def test_ray_job_submit_runs_the_loop(head, tiny_model_dir, tmp_path):
    address, env = head
    import random

    rng = random.Random(11)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"j{i}",
                    "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))),
                    "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))),
                }
            )
            + "\n"
            for i in range(30)
        )
    )
    run_dir = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": tiny_model_dir,
                "datasets": [{"path": str(corpus)}],
                "output_dir": str(run_dir),
                "sequence_len": 64,
                "iterations": 1,
                "selection": {"ratio": 4},
                "scoring": {"torch_threads": 1, "batch_size": 16},
                "ray_num_workers": 1,
                "deepspeed": 2,
                "micro_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "resources_per_worker": {"CPU": 1},
            }
        )
    )
    runtime_env = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}
    # `ray job submit` waits for the job and exits non-zero unless it SUCCEEDED. The job server
    # answers before the head's agent that runs jobs is up ("No available agent"): retry on that only.
    deadline = time.time() + 120
    while True:
        job = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(ROOT),
                "--runtime-env-json",
                json.dumps(runtime_env),
                "--submission-id",
                "iterit-test-job",
                "--",
                "python",
                "ray_jobs/run.py",
                "--config",
                str(config),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
    assert "Job 'iterit-test-job' succeeded" in job.stdout + job.stderr
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, "iterit-test-job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()
    # The job's driver printed the loop's summary table, and wrote every artifact.
    assert f"run: {run_dir}" in job.stdout
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values()) and "iter_0/train" in stages
    assert len((run_dir / "iter_0" / "selection.jsonl").read_text().splitlines()) == 4
    assert (run_dir / "model" / "iter_0" / "iterit_export.json").exists()
    assert (run_dir / "report" / "report.md").exists()


def test_run_entrypoint_maps_config_to_the_run_command():
    sys.path.insert(0, str(ROOT / "ray_jobs"))
    try:
        from run import cli_args
    finally:
        sys.path.pop(0)
    assert cli_args(["--config", "c.yaml", "--set", "seed=1"]) == ["run", "c.yaml", "--set", "seed=1"]
    assert cli_args(["--resume", "s3://b/run"]) == ["run", "--resume", "s3://b/run"]
