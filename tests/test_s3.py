"""Runs on a real S3 API: moto's S3 server on loopback (a subprocess, stopped by pid), with its endpoint
in the environment of a Ray head started for these tests and of every driver (AWS_ENDPOINT_URL: s3fs,
botocore and pyarrow's S3 filesystem all take it). Ingest from s3://, `iterit run` with output_dir on
s3://, its driver killed mid-iteration and resumed to the selections of an uninterrupted local run,
the report. fsspec's in-memory filesystem hides what a real S3 API does: listings, multipart uploads,
renames that are copies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from multinode_cluster import Cluster, free_port, until

pytestmark = pytest.mark.multinode  # a Ray head of its own, as the multi-node tests start them

BUCKET = "iterit-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(environment of a client of the server, an s3fs filesystem on it)."""
    import s3fs

    port = free_port()
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    until("moto's S3 server", listening, timeout=60)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    fs = s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}
    )
    fs.mkdir(BUCKET)
    yield env, fs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def s3_cluster(s3):
    env, _ = s3
    cluster = Cluster()
    cluster.env.update(env)
    try:
        cluster.start_head("node_a", cpus=3)
        yield cluster
    finally:
        cluster.stop()


def driver(cluster: Cluster, args: list, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "iterit", *map(str, args)],
            env=cluster.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def test_ingest_reads_and_writes_s3(s3, s3_cluster, loop_corpus, tmp_path):
    _, fs = s3
    fs.put(str(loop_corpus), f"{BUCKET}/data/corpus.jsonl")
    log = tmp_path / "ingest.log"
    out = finished(
        driver(
            s3_cluster,
            ["ingest", "--data", f"s3://{BUCKET}/data/", "--output", f"s3://{BUCKET}/ingested"],
            log,
        ),
        log,
    )
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file(f"{BUCKET}/ingested/summary.json"))
    assert (summary["read"], summary["accepted"], summary["rejected"]) == (61, 60, 1), out
    assert summary["files"][0]["source"] == f"s3://{BUCKET}/data/corpus.jsonl"
    assert [
        json.loads(line)["reason"] for line in fs.cat_file(f"{BUCKET}/ingested/rejects.jsonl").splitlines()
    ] == ["missing_field"]
    assert not [p for p in fs.find(f"{BUCKET}/ingested") if ".tmp-" in p]  # every temporary renamed


def _stage(fs, manifest: str, stage: str) -> str | None:
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(manifest))["stages"].get(stage, {}).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_a_run_on_s3_killed_and_resumed_selects_as_a_local_run(
    s3, s3_cluster, tiny_run_config, loop_corpus, uninterrupted, tmp_path
):
    _, fs = s3
    run = f"s3://{BUCKET}/runs/tiny"
    local = uninterrupted[0]  # the same config, run on local disk
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump(tiny_run_config(loop_corpus, run)))

    manifest = f"{BUCKET}/runs/tiny/manifest.json"
    first = driver(s3_cluster, ["run", tmp_path / "s3.yaml"], tmp_path / "s3-1.log")
    until(
        "iteration 1's scoring",
        lambda: first.poll() is not None or _stage(fs, manifest, "iter_1/score") == "running",
        timeout=400,
    )
    assert first.poll() is None, (tmp_path / "s3-1.log").read_text()[-3000:]
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _stage(fs, manifest, "iter_0/train") == "done"

    out = finished(driver(s3_cluster, ["run", "--resume", run], tmp_path / "s3-2.log"), tmp_path / "s3-2.log")
    fs.invalidate_cache()
    stages = json.loads(fs.cat_file(manifest))["stages"]
    assert all(s["status"] == "done" for s in stages.values()), out[-3000:]
    import pyarrow.parquet as pq

    for e in range(2):
        got = [
            json.loads(line)["id"]
            for line in fs.cat_file(f"{BUCKET}/runs/tiny/iter_{e}/selection.jsonl").splitlines()
        ]
        want = [json.loads(line)["id"] for line in open(local / f"iter_{e}" / "selection.jsonl")]
        assert got == want and len(set(got)) == 6
        order = pq.read_table(
            fs.open(f"{BUCKET}/runs/tiny/iter_{e}/order.parquet", "rb"), columns=["id", "status"]
        )
        assert (
            order.to_pydict()
            == pq.read_table(local / f"iter_{e}" / "order.parquet", columns=["id", "status"]).to_pydict()
        )
    # every scored id exactly once in iteration 1's parts (written by the cluster, resumed)
    parts = [p for p in fs.find(f"{BUCKET}/runs/tiny/iter_1/scores") if p.endswith(".parquet")]
    scored = [
        i for p in parts for i in pq.read_table(fs.open(p, "rb"), columns=["id"]).column("id").to_pylist()
    ]
    assert len(scored) == len(set(scored)) == 12

    log = tmp_path / "report.log"
    finished(driver(s3_cluster, ["report", run], log), log)
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/runs/tiny/report/report.md")


def test_a_run_with_a_proxy_on_s3_picks_as_a_local_one(
    s3, s3_cluster, tiny_run_config, loop_corpus, tiny_proxy_dir, proxy_uninterrupted, tmp_path
):
    """The proxy's folders (iter_0/proxy/) on object storage, written by the cluster: iteration 0 picks
    what the same config picks on local disk."""
    from conftest import proxy_tree

    _, fs = s3
    run = f"s3://{BUCKET}/runs/proxy"
    tree = proxy_tree(tiny_run_config, loop_corpus, run, tiny_proxy_dir, iterations=1)
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(tree))
    finished(
        driver(s3_cluster, ["run", tmp_path / "proxy.yaml"], tmp_path / "proxy.log"), tmp_path / "proxy.log"
    )
    fs.invalidate_cache()
    got = [
        json.loads(line)["id"]
        for line in fs.cat_file(f"{BUCKET}/runs/proxy/iter_0/selection.jsonl").splitlines()
    ]
    local = proxy_uninterrupted[0] / "iter_0" / "selection.jsonl"
    assert got == [json.loads(line)["id"] for line in open(local)]
    import pyarrow.parquet as pq

    parts = [p for p in fs.find(f"{BUCKET}/runs/proxy/iter_0/proxy/scores") if p.endswith(".parquet")]
    ids = [i for p in parts for i in pq.read_table(fs.open(p, "rb"), columns=["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 60  # the proxy scored all N, each id once


def test_the_run_lock_on_s3_refuses_a_second_driver_and_takes_over_a_killed_one(s3, monkeypatch):
    """RUN/lock.json on object storage: written, read back after the settle time (no create-if-absent
    there); a live holder (a second process) refuses this driver, its SIGKILL lets this one take over."""
    from test_runlock import HOLDER

    from iterit.errors import IteritError
    from iterit.runlock import RunLock

    env, fs = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = f"s3://{BUCKET}/locked-run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, run], stdout=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(IteritError, match=f"pid {holder.pid} on host "):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    said = []
    lock = RunLock(run)
    with lock.held(log=said.append):
        assert len(said) == 1 and "its process is gone" in said[0]
        fs.invalidate_cache()
        assert json.loads(fs.cat_file(f"{BUCKET}/locked-run/lock.json"))["token"] == lock.token
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/locked-run/lock.json")
