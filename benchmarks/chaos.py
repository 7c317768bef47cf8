"""Faults at random moments over whole loops: a seeded chaos run of the tiny-model loop on two Ray nodes.

    python benchmarks/chaos.py --trials 50 [--seed 0] [--out docs/results/chaos.json]

Each trial draws, from its seed, one fault and a moment uniform over the uninterrupted run's duration:
SIGKILL or SIGTERM of the driver's process group, SIGKILL of a scoring actor's or a Ray Train worker's
process, SIGKILL of the second node's raylet (a fresh node replaces it, as an autoscaler would), or an
OSError raised by the driver's Nth atomic write (N uniform over the reference run's writes). The run is
then resumed with `iterit run --resume` until it finishes. Each trial is checked against the
uninterrupted reference: manifest complete; every iteration's picks and order identical; the final
weights' largest difference; every id of every scores folder exactly once (lost, doubled); no
temporary file left; stages done before the fault not redone.

The nodes are tests/multinode_cluster.py's (`ray start` processes on this machine) and the model is the
tests' tiny Llama (tests/conftest.py build_tiny_model). A trial takes one to three minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import WORDS, build_tiny_model, tiny_run_tree  # noqa: E402
from multinode_cluster import Cluster  # noqa: E402

FAULTS = ["driver_sigkill", "driver_sigterm", "scoring_actor", "train_worker", "raylet", "write_error"]
PROCESS_TITLES = {"scoring_actor": "MapBatches(Scorer)", "train_worker": "RayTrainWorker"}
RESUMES = 4  # a trial that needs more resumes than this has failed

# The driver under a write fault: iterit.io.atomic_open raises on its Nth call (CHAOS_WRITE_N; 0 counts
# the calls into CHAOS_WRITE_COUNT at exit). Patched before iterit's modules bind the name.
WRITE_FAULT = """
import atexit, contextlib, os, runpy, sys
import iterit.io as io
n, calls, real = int(os.environ["CHAOS_WRITE_N"]), [0], io.atomic_open

@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    calls[0] += 1
    if calls[0] == n:
        raise OSError(5, "a write fault injected by benchmarks/chaos.py", str(path))
    with real(path, mode) as f:
        yield f

io.atomic_open = atomic_open
if "CHAOS_WRITE_COUNT" in os.environ:
    atexit.register(lambda: open(os.environ["CHAOS_WRITE_COUNT"], "w").write(str(calls[0])))
sys.argv = ["iterit", *sys.argv[1:]]
runpy.run_module("iterit", run_name="__main__")
"""


def write_corpus(path: Path, n: int = 80) -> Path:
    rng = random.Random(11)
    rows = [
        {
            "id": f"c{i}",
            "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(model: str, corpus: Path, run_dir: Path) -> dict:
    """The tests' tiny run at three iterations, k = 6, window 12, scoring batches of 8."""
    scoring = {"torch_threads": 1, "batch_size": 8, "template_cpus": 0.5}
    return tiny_run_tree(model, corpus, run_dir, iterations=3, scoring=scoring)


def driver(cluster: Cluster, args: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`iterit ARGS` in its own process group (what a fault on "the driver" kills), under WRITE_FAULT."""
    with open(log, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-c", WRITE_FAULT, *map(str, args)],
            env={**cluster.env, "CHAOS_WRITE_N": "0", **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def outcome(run_dir: Path) -> dict:
    """What a finished run is judged by: picks and orders per iteration, ids per scores folder, weights."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    from iterit.rundir import iter_scores

    out = {"picks": {}, "orders": {}, "ids": {}}
    for e in range(3):
        it = run_dir / f"iter_{e}"
        out["picks"][e] = [json.loads(line)["id"] for line in open(it / "selection.jsonl")]
        order = pq.read_table(it / "order.parquet", columns=["id", "status"]).to_pydict()
        out["orders"][e] = (order["id"], order["status"])
        out["ids"][e] = [
            i for t in iter_scores(str(it / "scores"), ["id"], False) for i in t["id"].to_pylist()
        ]
    weights = {}
    for f in sorted((run_dir / "model" / "iter_2").glob("*.safetensors")):
        weights.update(load_file(f))
    out["weights"] = weights
    return out


def stages_done(run_dir: Path) -> dict:
    try:
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v["finished"] for k, v in stages.items() if v.get("status") == "done"}


def kill_process(title: str) -> bool:
    """SIGKILL one process whose title names `title` (Ray titles its workers "ray::<class>..."); False when
    none runs at this moment."""
    for p in psutil.process_iter(["cmdline"]):
        if any(title in part for part in p.info["cmdline"] or ()) and "ray::" in " ".join(
            p.info["cmdline"] or ()
        ):
            p.kill()
            return True
    return False


def trial(
    i: int, seed: int, cluster: Cluster, cfg_of, ref: dict, duration: float, writes: int, work: Path
) -> dict:
    rng = random.Random(f"{seed}:{i}")
    kind = rng.choice(FAULTS)
    moment = rng.uniform(0, duration)
    write_n = rng.randint(1, writes)
    run_dir = work / f"trial_{i:03d}"
    config = work / f"trial_{i:03d}.yaml"
    config.write_text(yaml.safe_dump(cfg_of(run_dir)))
    log = work / f"trial_{i:03d}.log"
    env = {"CHAOS_WRITE_N": str(write_n)} if kind == "write_error" else None
    t0 = time.perf_counter()
    proc = driver(cluster, ["run", config], log, env)
    struck = kind == "write_error"
    if kind != "write_error":
        while time.perf_counter() - t0 < moment and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            if kind in ("driver_sigkill", "driver_sigterm"):
                os.killpg(proc.pid, signal.SIGKILL if kind == "driver_sigkill" else signal.SIGTERM)
                struck = True
            elif kind in PROCESS_TITLES:
                struck = kill_process(PROCESS_TITLES[kind])
            elif kind == "raylet":
                lost = cluster.second
                cluster.kill(lost)
                cluster.second = f"node_{chr(ord(lost[-1]) + 1)}"
                cluster.add_node(cluster.second, cpus=2)
                struck = True
    proc.wait(timeout=1800)
    if kind == "write_error":
        struck = proc.returncode != 0  # the Nth write may lie past what this attempt wrote
    before = stages_done(run_dir)
    resumes, code = 0, proc.returncode
    while code != 0 and resumes < RESUMES:
        resumes += 1
        resumed = driver(cluster, ["run", "--resume", run_dir], log)
        code = resumed.wait(timeout=1800)
    result = {"trial": i, "fault": kind, "moment_s": round(moment, 1), "struck": struck, "resumes": resumes}
    if kind == "write_error":
        result["write_n"] = write_n
    after = stages_done(run_dir)
    result["complete"] = code == 0 and all(
        s.get("status") == "done"
        for s in json.loads((run_dir / "manifest.json").read_text())["stages"].values()
    )
    result["stages_redone"] = sorted(k for k, t in before.items() if after.get(k) != t)
    result["temporary_files"] = [str(p) for p in run_dir.rglob("*.tmp-*")]
    if not result["complete"]:
        result.update(survived=False, log=str(log))
        return result
    got = outcome(run_dir)
    result["same_picks"] = got["picks"] == ref["picks"] and got["orders"] == ref["orders"]
    result["ids_lost"] = sum(len(set(ref["ids"][e]) - set(got["ids"][e])) for e in ref["ids"])
    result["ids_doubled"] = sum(len(got["ids"][e]) - len(set(got["ids"][e])) for e in got["ids"])
    diffs = [float(abs(got["weights"][k] - w).max()) for k, w in ref["weights"].items()]
    result["max_weight_diff"] = max(diffs) if diffs else None
    result["survived"] = (
        result["same_picks"]
        and not result["ids_lost"]
        and not result["ids_doubled"]
        and not result["temporary_files"]
        and not result["stages_redone"]
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/chaos", help="where the runs and their logs go (emptied first)")
    ap.add_argument("--out", default=None, help="a JSON file of every trial and the summary")
    args = ap.parse_args()
    import shutil

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = build_tiny_model(work / "tiny_model")
    corpus = write_corpus(work / "corpus.jsonl")

    def cfg_of(run_dir):
        return run_config(model, corpus, run_dir)

    cluster = Cluster()
    try:
        cluster.start_head("node_a", cpus=2)
        cluster.add_node("node_b", cpus=2)
        cluster.second = "node_b"
        ref_dir = work / "reference"
        (work / "reference.yaml").write_text(yaml.safe_dump(cfg_of(ref_dir)))
        t0 = time.perf_counter()
        count = work / "writes.txt"
        ref_proc = driver(
            cluster,
            ["run", work / "reference.yaml"],
            work / "reference.log",
            {"CHAOS_WRITE_COUNT": str(count)},
        )
        assert ref_proc.wait(timeout=1800) == 0, (work / "reference.log").read_text()[-3000:]
        duration, writes = time.perf_counter() - t0, int(count.read_text())
        ref = outcome(ref_dir)
        print(f"reference: {duration:.0f} s, {writes} atomic writes of the driver", flush=True)
        results = []
        for i in range(args.trials):
            r = trial(i, args.seed, cluster, cfg_of, ref, duration, writes, work)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        cluster.stop()
    survived = [r for r in results if r["survived"]]
    summary = {
        "trials": len(results),
        "faults": dict(Counter(r["fault"] for r in results)),
        "struck": sum(r["struck"] for r in results),
        "survived": len(survived),
        "ids_lost": sum(r.get("ids_lost", 0) for r in results),
        "ids_doubled": sum(r.get("ids_doubled", 0) for r in results),
        "stages_redone": sum(len(r["stages_redone"]) for r in results),
        "max_weight_diff": max((r.get("max_weight_diff") or 0.0) for r in results) if results else None,
        "reference_s": round(duration, 1),
    }
    print(
        f"{summary['trials']} trials ({summary['struck']} struck a live target), faults {summary['faults']}: "
        f"{summary['survived']} survived, {summary['ids_lost']} ids lost, {summary['ids_doubled']} doubled, "
        f"{summary['stages_redone']} done stages redone, largest weight difference "
        f"{summary['max_weight_diff']}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "trials": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
