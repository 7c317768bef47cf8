"""RUN/lock.json: one driver works on a run directory at a time (docs/run.md, "The run lock").

A second `iterit run --resume RUN` started by mistake, or a retried `ray job submit`, would otherwise
write the same manifest, scores and checkpoints as the first. The lock names its holder (host, pid,
the process's start time, when it started) and a heartbeat the holder rewrites every HEARTBEAT_S.

A driver that finds the lock held:
- refuses, with one line naming the holder and how to take over, while the holder is alive;
- takes it over by itself when the holder is gone: its pid is dead (or reused by another process) on
  this host, or, from another host, its heartbeat is older than STALE_S;
- takes it over by force with `iterit run --resume RUN --take-over` (the holder on a host that died
  before STALE_S passed).

Creation is exclusive on a local disk (O_EXCL). Object storage has no create-if-absent here, so a
driver writes its lock, waits SETTLE_S and reads it back: the last writer holds it. Two drivers that
both pass that check (their writes within the same instant) are still told apart at the loser's next
heartbeat or manifest save, which stop it (Manifest.guard -> RunLock.check).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid

import psutil

from iterit.errors import IteritError
from iterit.io import atomic_write_text, filesystem
from iterit.rundir import RunDir

HEARTBEAT_S = float(os.environ.get("ITERIT_LOCK_HEARTBEAT_S", 30))
STALE_S = float(os.environ.get("ITERIT_LOCK_STALE_S", 300))  # 10 missed heartbeats
SETTLE_S = 1.0  # object storage: how long a driver waits before reading its own lock back


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}, "
        f"last heartbeat {age:.0f} s ago)"
    )


def why_stale(holder: dict) -> str | None:
    """Why the holder in a lock file is gone (a reason to take the lock over), or None while it may live."""
    if holder.get("host") == socket.gethostname():
        start = _process_start(int(holder.get("pid", -1)))
        if start is None:
            return "its process is gone"
        if abs(start - float(holder.get("process_start", 0))) > 1.0:
            return "its pid now belongs to another process"
        return None
    if time.time() - float(holder.get("heartbeat", 0)) > STALE_S:
        return f"no heartbeat for more than {STALE_S:.0f} s"
    return None


class RunLock:
    """Hold a run directory while a driver works on it: `with RunLock(path).held(log): ...`."""

    def __init__(self, run_path: str):
        self.run_path = run_path
        self.path = RunDir(run_path).lock
        self.token = uuid.uuid4().hex
        self.lost: dict | None = None  # the holder that replaced this driver's lock, once seen
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self) -> dict:
        pid = os.getpid()
        return {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": pid,
            "process_start": _process_start(pid),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": time.time(),
        }

    def read(self) -> dict | None:
        """The lock file's holder; None when there is none. A lock file that does not parse (a write cut
        short) names no live holder: it reads as {}, which is stale."""
        fs, p = filesystem(self.path)
        try:
            with fs.open(p, "r") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _create_exclusive(self, record: dict) -> bool:
        """Write the lock only if there is none: atomic on a local disk; elsewhere, write then read back."""
        fs, p = filesystem(self.path)
        if "://" not in str(self.path):
            os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
            return True
        if self.read() is not None:
            return False
        atomic_write_text(self.path, json.dumps(record) + "\n")
        return self._confirm()

    def _confirm(self) -> bool:
        time.sleep(SETTLE_S)
        return (self.read() or {}).get("token") == self.token

    def acquire(self, take_over: bool = False, log=print) -> None:
        """Hold the lock, or raise IteritError naming the live holder and how to take over."""
        record = self._record()
        if self._create_exclusive(record):
            return
        holder = self.read()
        if holder is None:  # released between our two looks
            if self._create_exclusive(record):
                return
            holder = self.read() or {}
        reason = "--take-over" if take_over else why_stale(holder)
        if reason is None:
            raise IteritError(
                f"{self.run_path} is held by another driver: {_describe(holder)}. Wait for it or stop it; "
                f"if it is gone, `iterit run --resume {self.run_path} --take-over` takes the run over"
            )
        atomic_write_text(self.path, json.dumps(record) + "\n")
        if not self._confirm():
            raise IteritError(
                f"{self.run_path}: another driver took the run over at the same moment "
                f"({_describe(self.read() or {})}); this one stops"
            )
        log(f"[lock] took over {self.path} from {_describe(holder)}: {reason}")

    def check(self) -> None:
        """Raise if another driver holds the lock now (this one was taken over, or lost a race)."""
        holder = self.lost
        if holder is None:
            current = self.read()
            if current is not None and current.get("token") != self.token:
                holder = self.lost = current
        if holder is not None:
            raise IteritError(
                f"{self.run_path} was taken over by another driver ({_describe(holder)}); this driver "
                "stops without writing more"
            )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is retried; STALE_S allows ten
                current = self.read()
                if current is not None and current.get("token") != self.token:
                    self.lost = current
                    return
                atomic_write_text(
                    self.path, json.dumps({**(current or self._record()), "heartbeat": time.time()}) + "\n"
                )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this driver's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        with contextlib.suppress(Exception):
            if (self.read() or {}).get("token") == self.token:
                fs, p = filesystem(self.path)
                fs.rm(p)

    @contextlib.contextmanager
    def held(self, take_over: bool = False, log=print):
        self.acquire(take_over, log)
        self._beat = threading.Thread(target=self._heartbeat, name="iterit-run-lock", daemon=True)
        self._beat.start()
        try:
            yield self
        finally:
            self.release()
