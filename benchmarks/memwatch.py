"""Peak memory while a block of code runs, sampled every 0.1 s by a thread:

- the driver: this process's resident set (VmRSS of /proc/self/status);
- the run: the machine's used memory (MemTotal - MemAvailable of /proc/meminfo) above its level when the
  block began. That is every process of the run together (driver, raylet, Ray's workers, the object
  store's shared memory), with shared pages counted once, unlike summed RSS. Other work on the machine
  counts too, so run benchmarks alone.

    with MemoryWatch() as mem:
        ...
        mem.phase("greedy")  # optional: peaks are also kept per phase (mem.run_peak_mb_of["greedy"])
        ...
    mem.driver_peak_mb, mem.run_peak_mb
"""

from __future__ import annotations

import threading


def _kib(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in {path}")


def machine_used_kib() -> int:
    return _kib("/proc/meminfo", "MemTotal") - _kib("/proc/meminfo", "MemAvailable")


def driver_rss_kib() -> int:
    return _kib("/proc/self/status", "VmRSS")


class MemoryWatch:
    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.driver_peak_kib = self.run_peak_kib = 0
        self.current, self.phase_kib = "run", {"run": 0}

    def phase(self, name: str) -> None:
        self._sample()
        self.current = name
        self.phase_kib[name] = 0

    def _sample(self) -> None:
        self.driver_peak_kib = max(self.driver_peak_kib, driver_rss_kib())
        used = machine_used_kib() - self.baseline_kib
        self.run_peak_kib = max(self.run_peak_kib, used)
        self.phase_kib[self.current] = max(self.phase_kib[self.current], used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemoryWatch:
        self.baseline_kib = machine_used_kib()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def driver_peak_mb(self) -> float:
        return self.driver_peak_kib / 1024

    @property
    def run_peak_mb(self) -> float:
        return self.run_peak_kib / 1024

    @property
    def run_peak_mb_of(self) -> dict[str, float]:
        return {name: kib / 1024 for name, kib in self.phase_kib.items()}
