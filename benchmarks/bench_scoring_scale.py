"""Scoring at scale: the driver's memory against N, and the cluster-written scores against the old path.

    python benchmarks/bench_scoring_scale.py                     # --small 20000 --large 200000

A tiny Llama (hidden 64, 2 layers, the demo's SmolLM2 tokenizer) scores synthetic conversations on a
local Ray (2 CPUs, one actor), each run in its own process so that ru_maxrss is that driver's alone:
  memory      iterit's run_scoring at --small and --large rows: the driver's peak RSS (the scores are
              written by Ray's workers and summarised part by part; nothing grows with N on the driver)
  throughput  at --small rows, the same Ray Dataset (iterit.scoring.pipeline.scoring_dataset) consumed
              (old) on the driver, iter_batches into one Parquet file, as iterit did before scores were
              a folder, and (new) by run_scoring (write_parquet by the workers, then the summary)
Memory is also sampled while scoring (benchmarks/memwatch.py): the driver's RSS, and the machine's used
memory above its level before (every process of the run together, shared pages once).
Prints the RSS figures and their ratios (target: large within 1.3x of small), and rows/s of both
paths and new / old (target: >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
WORDS = "the a model data answer question explain write code list python function return value".split()


def tiny_model(out: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from iterit.demo import prepare_demo
    from iterit.templates import load_tokenizer

    tok = load_tokenizer(prepare_demo(log=lambda *_: None)["model"])
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def corpus(path: str, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            row = {
                "id": f"s{i}",
                "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
                # Short responses: the tiny model's 49K-token head is most of its cost per response
                # token, and this benchmark is about the driver's memory, not the model's speed.
                "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
            }
            f.write(json.dumps(row) + "\n")


def config(model: str, data: str):
    from iterit.config import config_from_dict

    return config_from_dict(
        {
            "base_model": model,
            "datasets": [{"path": data}],
            "sequence_len": 128,
            "scoring": {
                "batch_size": 512,
                "token_budget": 16384,
                "cpus_per_actor": 1,
                "torch_threads": 1,
                "template_cpus": 0.5,
                "dtype": "float32",
            },
        }
    )


def one(mode: str, model: str, n: int, work: str) -> dict:
    """A single measurement in this process: ingest, then the scoring path `mode` (new or old)."""
    import ray
    from bench_scoring import score_through_driver
    from memwatch import MemoryWatch

    from iterit.data import ingest
    from iterit.scoring.pipeline import run_scoring

    data = os.path.join(work, f"corpus-{n}.jsonl")
    if not os.path.exists(data):
        corpus(data, n)
    cfg = config(model, data)
    ing = ingest(cfg.datasets, os.path.join(work, f"ingest-{n}"), cfg.system_prompt)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = tempfile.mkdtemp(dir=work)
    with MemoryWatch() as mem:  # from Ray's start to its shutdown: the scoring stage alone
        ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        t0 = time.perf_counter()
        if mode == "new":
            summary = run_scoring(cfg, ing["samples"], out, log=lambda *_: None)
            rows = summary["rows"]
        else:  # the path before scores were a folder: every row through the driver into one file
            rows = score_through_driver(cfg, ing["samples"], out)
        seconds = time.perf_counter() - t0
        ray.shutdown()
    return {
        "mode": mode,
        "n": n,
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver_peak_rss_before_ray_mb": rss_before / 1024,
        "driver_peak_rss_scoring_mb": mem.driver_peak_mb,
        "run_peak_used_mb": mem.run_peak_mb,
    }


def child(mode: str, model: str, n: int, work: str) -> dict:
    cmd = [sys.executable, HERE, "--one", mode, "--model", model, "--n", str(n), "--work", work]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if out.returncode != 0:
        raise SystemExit(f"{mode} at {n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=20_000)
    p.add_argument("--large", type=int, default=200_000)
    p.add_argument("--one", choices=["new", "old"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model, args.n, args.work)))
        return
    with tempfile.TemporaryDirectory() as work:
        model = tiny_model(os.path.join(work, "model"))
        runs = [child("new", model, n, work) for n in (args.small, args.large)] + [
            child("old", model, args.small, work)
        ]
    for r in runs:
        print(json.dumps(r))
    small, large, old = runs
    for key, what in (
        ("driver_peak_rss_mb", "driver peak RSS, whole process (ingest and imports included)"),
        ("driver_peak_rss_scoring_mb", "driver peak RSS while scoring"),
        ("run_peak_used_mb", "machine memory used while scoring, above before (every process, shared once)"),
    ):
        print(
            f"{what}: {small[key]:,.0f} MB at {small['n']:,} rows, {large[key]:,.0f} MB at {large['n']:,} "
            f"rows: {large[key] / small[key]:.2f}x for {large['n'] / small['n']:.0f}x the rows"
            + (" (target <= 1.3x)" if key.startswith("driver") else "")
        )
    print(
        f"throughput at {small['n']:,} rows: written by the workers {small['rows_per_s']:,.0f} rows/s, "
        f"through the driver {old['rows_per_s']:,.0f} rows/s: new / old = "
        f"{small['rows_per_s'] / old['rows_per_s']:.2f} (target >= 1)"
    )


if __name__ == "__main__":
    main()
