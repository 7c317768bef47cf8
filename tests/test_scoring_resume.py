"""A scoring stage killed with its driver (SIGKILL of the whole process group) halfway through, then
run again as a user would: every id in exactly one part, nothing committed scored again, the same
numbers as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import WORDS

from iterit.rundir import iter_scores, read_scores, score_parts

N = 1200


@pytest.fixture(scope="module")
def resume_config(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("resume")
    rng = random.Random(3)
    rows = [
        {
            "id": f"r{i}",
            "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20))),
        }
        for i in range(N)
    ]
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "base_model": tiny_model_dir,
        "datasets": [{"path": str(d / "corpus.jsonl")}],
        "output_dir": str(d / "unused"),
        "sequence_len": 64,
        "scoring": {"batch_size": 8, "token_budget": 1024, "torch_threads": 1, "template_cpus": 0.25},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d / "config.yaml"


def _committed_rows(checkpoint: Path) -> int:
    """Ids Ray Data has committed: its checkpoint's finished files (pending ones are not yet)."""
    rows = 0
    for p in checkpoint.rglob("*.parquet") if checkpoint.exists() else []:
        if ".pending." not in p.name:
            try:
                rows += pq.ParquetFile(p).metadata.num_rows
            except FileNotFoundError:  # committed files are final; this one was being renamed
                pass
    return rows


def test_a_killed_scoring_stage_resumes_each_id_once(ray_local, resume_config, tmp_path, cli):
    out = tmp_path / "scored"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "disabled",
    }
    driver = subprocess.Popen(
        [sys.executable, "-m", "iterit", "score", "--config", str(resume_config), "--output", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the driver and all it started
    )
    checkpoint, committed, t0 = out / "scores.checkpoint", 0, time.time()
    while time.time() - t0 < 300:
        assert driver.poll() is None, "the stage finished before it could be killed: make the corpus larger"
        committed = _committed_rows(checkpoint)
        if committed >= N // 3:
            break
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert 0 < committed < N, committed
    committed = _committed_rows(checkpoint)  # what the kill left committed

    code, said, err = cli(["score", "--config", resume_config, "--output", out])
    assert code == 0, err
    assert "resuming" in said
    summary = json.loads((out / "score_summary.json").read_text())
    ids = [
        i
        for t in iter_scores(str(out / "scores"), ["id"], scored_only=False)
        for i in t.column("id").to_pylist()
    ]
    assert len(ids) == len(set(ids)) == N == summary["rows"]  # every id in exactly one part
    assert summary["resumed_rows"] >= committed  # nothing committed was scored again
    assert summary["resumed_rows"] + summary["scored_rows"] == N
    assert summary["scored"] + summary["rejected"] == N
    assert not checkpoint.exists()  # a finished stage leaves no checkpoint

    # the same numbers as an uninterrupted run (fp32)
    code, _, err = cli(["score", "--config", resume_config, "--output", tmp_path / "straight"])
    assert code == 0, err
    a = read_scores(str(out / "scores"), ["id", "ifd", "loss_cond", "loss_prior"]).to_pylist()
    b = {
        r["id"]: r
        for r in read_scores(
            str(tmp_path / "straight" / "scores"), ["id", "ifd", "loss_cond", "loss_prior"]
        ).to_pylist()
    }
    assert len(a) == len(b)
    for r in a:
        for k in ("ifd", "loss_cond", "loss_prior"):
            assert r[k] == pytest.approx(b[r["id"]][k], rel=1e-6, abs=1e-9)

    # run again: a finished folder is summarised, not scored; --fresh starts over
    parts = score_parts(str(out / "scores"))
    code, said, _ = cli(["score", "--config", resume_config, "--output", out])
    assert code == 0 and "is complete" in said and score_parts(str(out / "scores")) == parts
    again = json.loads((out / "score_summary.json").read_text())
    assert (again["rows"], again["resumed_rows"], again["scored_rows"]) == (N, N, 0)
