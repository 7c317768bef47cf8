"""Training memory on CPU: partitioned loading under ZeRO-3 and gradient checkpointing, each against the
path without it, same data, same init, fp32 (the set-up also in bf16).

    python benchmarks/bench_training_memory.py  # --samples 16 --seq-len 512 --micro 2 --accum 2
    python benchmarks/bench_training_memory.py --only load --bf16  # (0) alone, a load that converts

(0) Set-up alone, 2 ranks (plain processes, gloo), ZeRO-3: iterit's setup_model_and_optimizer (the
    model load, then deepspeed.initialize with AdamW) with zero3_init false (every rank loads the whole
    model; DeepSpeed partitions it in deepspeed.initialize) against true (weights load straight into
    each rank's partition). Per rank: the growth of VmHWM and the peak of RssAnon (anonymous memory,
    sampled every 10 ms: what the rank holds privately; transformers memory-maps the safetensors file,
    whose page-cache pages, shared by the ranks of a node, count in VmHWM but not in RssAnon) over the
    set-up, less the same figures just before it (imports and the process group).
(1) ZeRO-3, 2 workers x 1 thread, a whole fit: zero3_init false against true.
(2) ZeRO-0, 1 worker x 2 threads, micro-batches of --micro x --seq-len tokens: gradient_checkpointing
    false against true.
Each configuration runs iterit.training.trainer.train in its own process (its own local Ray). Peak RSS
of a worker = the kernel's high-water mark (VmHWM of /proc/PID/status) of each Ray Train worker
process, read every 0.1 s until it exits, so a short peak while loading is not missed. Losses: the max
difference of the two loss traces (each pair must train the same numbers).
Model: the demo SmolLM2-135M-Instruct (fp32) or --model; data: the first demo ShareGPT conversations
that survive --seq-len (bench_training.prepare).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from bench_training import bench_config, prepare

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "full_load": dict(workers=2, zero=3, threads=1, zero3_init=False, gradient_checkpointing=False),
    "partitioned": dict(workers=2, zero=3, threads=1, zero3_init=True, gradient_checkpointing=False),
    "no_checkpointing": dict(workers=1, zero=0, threads=2, zero3_init=True, gradient_checkpointing=False),
    "checkpointing": dict(workers=1, zero=0, threads=2, zero3_init=True, gradient_checkpointing=True),
}


def _hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


class WorkerPeaks:
    """VmHWM of every process of this tree whose command line names Ray Train's worker actor."""

    def __init__(self):
        import psutil

        self.me, self.peak_kib = psutil.Process(), {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.wait(0.1):
            for p in self.me.children(recursive=True):
                try:
                    if "TrainWorker" not in " ".join(p.cmdline()):
                        continue
                except psutil.Error:
                    continue
                hwm = _hwm_kib(p.pid)
                if hwm:
                    self.peak_kib[p.pid] = max(hwm, self.peak_kib.get(p.pid, 0))

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return sorted(round(k / 1024) for k in self.peak_kib.values())


def run_one(args) -> dict:
    """One configuration in this process: a fresh local Ray, one fit, the workers' peaks and losses."""
    import ray

    from iterit.training.trainer import read_metrics, train

    with open(args.prep) as f:
        prep = json.load(f)
    args.model_dir = prep["model"]
    c = CONFIGS[args.one]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-train-mem-") as run_dir:
        cfg = bench_config(args, run_dir, c["workers"], c["zero"], c["threads"]).model_copy(
            update={"zero3_init": c["zero3_init"], "gradient_checkpointing": c["gradient_checkpointing"]}
        )
        peaks = WorkerPeaks()
        t0 = time.perf_counter()
        train(cfg, run_dir, {0: prep["ids"]}, prep["samples"], k=len(prep["ids"]), name=args.one, log=print)
        seconds = time.perf_counter() - t0
        metrics = read_metrics(run_dir, 0)
    return {
        "worker_peak_mb": peaks.stop(),
        "losses": [m["loss"] for m in metrics],
        "tokens": sum(m["tokens"] for m in metrics),
        "train_seconds": sum(m["seconds"] for m in metrics),
        "fit_seconds": seconds,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def load_one(args) -> dict:
    """One rank of the set-up measurement (0): what a Ray Train worker runs before its first step."""
    import deepspeed
    import torch

    from iterit.rundir import RunDir
    from iterit.training.train_loop import setup_model_and_optimizer
    from iterit.training.trainer import worker_job

    with open(args.prep) as f:
        prep = json.load(f)
    args.model_dir = prep["model"]
    zero3_init = args.load == "partitioned"
    with tempfile.TemporaryDirectory(prefix="bench-train-mem-load-") as run_dir:
        cfg = bench_config(args, run_dir, 2, 3, 1).model_copy(
            update={"zero3_init": zero3_init, "bf16": args.bf16}
        )
        job = worker_job(cfg, RunDir(run_dir), [0], k=len(prep["ids"]), gpu=False)
        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo")
        before_hwm, before_anon = _status_kib("VmHWM"), _status_kib("RssAnon")
        peak_anon, stop = [before_anon], threading.Event()

        def sample():
            while not stop.wait(0.01):
                peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        engine, _ = setup_model_and_optimizer(job)
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        held_anon = _status_kib("RssAnon")
        peak_anon[0] = max(peak_anon[0], held_anon)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {
        "load_hwm_mb": (_status_kib("VmHWM") - before_hwm) / 1024,
        "load_anon_mb": (peak_anon[0] - before_anon) / 1024,
        "held_anon_mb": (held_anon - before_anon) / 1024,
        "seconds": seconds,
    }


def measure_loading(args, prep_path: str) -> dict:
    """(0) for both paths: per rank, the load's growth of VmHWM and peak RssAnon."""
    out = {}
    for name in ("full_load", "partitioned"):
        port = _free_port()
        procs = []
        for r in range(2):
            env = {
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "PYTHONWARNINGS": "ignore",
            }
            cmd = [sys.executable, os.path.join(HERE, "bench_training_memory.py"), "--load", name]
            cmd += ["--prep", prep_path, "--seq-len", str(args.seq_len)] + ["--bf16"] * args.bf16
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        ranks = []
        for p in procs:
            stdout, stderr = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"loading {name} failed:\n{stderr[-4000:]}")
            ranks.append(json.loads(stdout.strip().splitlines()[-1]))
        out[name] = ranks
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(name: str, args, prep_path: str) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "bench_training_memory.py"), "--one", name, "--prep", prep_path]
    cmd += ["--seq-len", str(args.seq_len), "--micro", str(args.micro), "--accum", str(args.accum)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise SystemExit(f"configuration {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model folder (default: the demo SmolLM2-135M-Instruct)")
    ap.add_argument("--samples", type=int, default=16, help="training samples (one epoch)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro", type=int, default=2, help="micro-batch size")
    ap.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument(
        "--only", choices=["load", "loading", "checkpointing"], help="run one of the three measurements"
    )
    ap.add_argument("--load", help=argparse.SUPPRESS)
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="(0) in bf16: the load converts the fp32 checkpoint (private copies)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--prep", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.lr = 1e-4
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.load:
        print(json.dumps(load_one(args)))
        return

    pairs = {"loading": ("full_load", "partitioned"), "checkpointing": ("no_checkpointing", "checkpointing")}
    with tempfile.TemporaryDirectory(prefix="bench-train-mem-prep-") as tmp:
        prep = prepare(args.model, args.samples, args.seq_len, tmp)
        prep_path = os.path.join(tmp, "prep.json")
        with open(prep_path, "w") as f:
            json.dump(prep, f)
        print(
            f"model {prep['model']}; {len(prep['ids'])} samples, seq-len {args.seq_len}, micro {args.micro} "
            f"x accum {args.accum}, fp32"
        )
        if args.only in (None, "load"):
            loads = measure_loading(args, prep_path)
            dtype = "bf16" if args.bf16 else "fp32"
            print(f"(0) set-up (load + deepspeed.initialize), ZeRO-3, {dtype}, 2 ranks: growth, per rank")
            print(f"{'':44} {'VmHWM MB':>10} {'peak RssAnon MB':>16} {'RssAnon after':>14} {'s':>6}")
            for name, ranks in loads.items():
                for r, x in enumerate(ranks):
                    print(
                        f"{name + f' rank {r}':44} {x['load_hwm_mb']:10,.0f} {x['load_anon_mb']:16,.0f} "
                        f"{x['held_anon_mb']:14,.0f} {x['seconds']:6.1f}"
                    )
            full, part = (max(x["load_anon_mb"] for x in loads[n]) for n in ("full_load", "partitioned"))
            print(
                f"  partitioned / full_load: largest rank's anonymous memory over the load x{part / full:.2f}"
            )
            if args.only == "load":
                return
        print("(1), (2): whole fits")
        print(f"{'':44} {'worker peak RSS MB':>20} {'tokens/s':>9} {'steps':>5} {'max |loss diff|':>15}")
        for pair, (before, after) in pairs.items():
            if args.only and args.only != pair:
                continue
            a, b = child(before, args, prep_path), child(after, args, prep_path)
            diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
            assert len(a["losses"]) == len(b["losses"])
            for name, r in ((before, a), (after, b)):
                c = CONFIGS[name]
                label = f"{name} (ZeRO-{c['zero']}, {c['workers']} worker{'s' * (c['workers'] > 1)})"
                rate = r["tokens"] / r["train_seconds"]
                peaks = ", ".join(f"{p:,}" for p in r["worker_peak_mb"])
                print(f"{label:44} {peaks:>20} {rate:9,.0f} {len(r['losses']):5} {diff:15.2e}")
            ratio = max(b["worker_peak_mb"]) / max(a["worker_peak_mb"])
            print(f"  {after} / {before}: largest worker peak x{ratio:.2f}")


if __name__ == "__main__":
    main()
