"""The run lock (iterit.runlock): one driver per run directory. A second driver refuses while the holder
lives; a holder that is gone (dead pid on this host, or a silent heartbeat from another) is taken over;
a driver taken over stops at its next manifest save. The S3 versions are in tests/test_s3.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from iterit import runlock
from iterit.errors import IteritError
from iterit.rundir import Manifest, RunDir
from iterit.runlock import RunLock

# A second process that holds RUN's lock until it is killed (prints "held" once it does).
HOLDER = """
import sys, time
from iterit.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture()
def holder_process():
    started = []

    def start(run_path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(run_path)], stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_second_driver_refuses_while_the_holder_lives(tmp_path, holder_process):
    proc = holder_process(tmp_path)
    with pytest.raises(IteritError) as e:
        RunLock(str(tmp_path)).acquire()
    line = str(e.value)
    assert f"pid {proc.pid} on host " in line and "--take-over" in line and "\n" not in line
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == proc.pid  # untouched


def test_a_lock_whose_process_was_killed_is_taken_over(tmp_path, holder_process):
    proc = holder_process(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    said = []
    lock = RunLock(str(tmp_path))
    lock.acquire(log=said.append)
    assert len(said) == 1 and said[0].startswith(
        f"[lock] took over {tmp_path}/lock.json from pid {proc.pid} "
    )
    assert "its process is gone" in said[0]
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == lock.token


def write_lock(path, **fields):
    holder = {"token": "other", "host": "elsewhere", "pid": 1, "process_start": 0.0, "started": "then"}
    path.write_text(json.dumps({**holder, **fields}))


def test_another_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path):
    write_lock(tmp_path / "lock.json", heartbeat=time.time() - 10)
    with pytest.raises(IteritError, match="pid 1 on host elsewhere"):
        RunLock(str(tmp_path)).acquire()
    write_lock(tmp_path / "lock.json", heartbeat=time.time() - runlock.STALE_S - 1)
    said = []
    RunLock(str(tmp_path)).acquire(log=said.append)
    assert "no heartbeat for more than" in said[0]


def test_take_over_takes_a_live_holders_lock_and_the_holder_stops_at_its_next_save(tmp_path):
    run = RunDir(str(tmp_path))
    first = RunLock(run.path)
    with first.held():
        manifest = Manifest.create(run, seed=0, iterations=1)
        manifest.guard = first.check
        manifest.save()  # still the holder
        second = RunLock(run.path)
        second.acquire(take_over=True, log=lambda _: None)
        with pytest.raises(IteritError, match="taken over by another driver"):
            manifest.save()
    # the first driver's release leaves the second's lock in place
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == second.token
    second.release()
    assert not (tmp_path / "lock.json").exists()


def test_a_lock_file_that_does_not_parse_is_taken_over(tmp_path):
    (tmp_path / "lock.json").write_text('{"token": "cut sh')
    said = []
    RunLock(str(tmp_path)).acquire(log=said.append)
    assert said and said[0].startswith("[lock] took over")


def test_the_heartbeat_moves_and_release_removes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with RunLock(str(tmp_path)).held():
        first = json.loads((tmp_path / "lock.json").read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / "lock.json").read_text())["heartbeat"] > first
    assert not (tmp_path / "lock.json").exists()


def test_iterit_run_resume_refuses_a_held_run_with_one_line(tmp_path, cli):
    """The CLI, as a user's second `iterit run --resume` by mistake: exit code of a user error, one
    line naming this process as the holder, nothing of the run touched."""
    run = RunDir(str(tmp_path / "run"))
    Manifest.create(run, seed=0, iterations=1)
    before = (tmp_path / "run" / "manifest.json").read_text()
    with RunLock(run.path).held():
        code, out, err = cli(["run", "--resume", run.path])
    assert code != 0 and f"pid {os.getpid()} on host" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "run" / "manifest.json").read_text() == before
    code, _, err = cli(["run", str(tmp_path / "x.yaml"), "--take-over"])
    assert code != 0 and "--take-over goes with --resume" in err
