"""Scoring throughput and exactness on the demo model (SmolLM2-135M-Instruct) and demo ShareGPT data.

    python benchmarks/bench_scoring.py                     # --n 48 --rank-n 400 --max-length 256
    python benchmarks/bench_scoring.py --configs de --rank-n 0   # the write path only: (d) against (e)

Each configuration runs in its own process (so peak RSS is its own), on the same templated samples:
  (a) reference: batch size 1, full logits, fp32 (a careful per-sample loop)
  (b) iterit's in-process scorer, fp32 (span-only head, token-budget micro-batches)
  (c) the same in bf16
  (d) the Ray Data pipeline with 2 actors (templating included, actor start-up included): iterit's
      run_scoring, the scores written by the workers (write_parquet) and summarised part by part
  (e) the same Ray Dataset consumed as iterit did before scores were a folder: every row through the
      driver's iter_batches into one Parquet file (the reference of (d): new / old is printed)
and prints tokens/s, samples/s, achieved FLOP/s as a fraction of a GEMM rate measured in the same
run, padding fraction, peak RSS; then the ranking agreement of bf16 with fp32 IFD on --rank-n
samples (Spearman, overlap of the top-5% sets). On a GPU machine it runs on the GPU.
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

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def templated_samples(n: int, max_length: int, seed: int = 0):
    """n demo conversations (seeded) whose response survives max_length, templated with SmolLM2."""
    from iterit.config import DatasetConfig
    from iterit.data import normalise, read_records
    from iterit.demo import prepare_demo
    from iterit.errors import RowError
    from iterit.templates import load_tokenizer, template_batch

    info = prepare_demo(log=lambda *_: None)
    tok = load_tokenizer(info["model"])
    ds = DatasetConfig(path="x", type="sharegpt")
    convs = []
    for _, rec in read_records(info["train"]):
        try:
            convs.append((rec["id"], normalise(rec, ds)))
        except (RowError, TypeError, KeyError):
            pass
    random.Random(seed).shuffle(convs)
    out = []
    for i in range(0, len(convs), 256):
        chunk = convs[i : i + 256]
        for (sid, msgs), t in zip(chunk, template_batch(tok, [m for _, m in chunk], max_length)):
            if not isinstance(t, RowError):
                out.append((sid, msgs, t))
        if len(out) >= n:
            return info["model"], out[:n]
    return info["model"], out


def gemm_rate(dtype, device: str, seconds: float = 3.0) -> float:
    """FLOP/s of a model-shaped matmul (2048 tokens x 576 -> 1536) in this dtype on this device."""
    import torch

    a = torch.randn(2048, 576, dtype=dtype, device=device)
    b = torch.randn(576, 1536, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return n * 2 * 2048 * 576 * 1536 / (time.perf_counter() - t0)


def useful_flops(model, samples) -> float:
    """Forward FLOPs that scoring needs: 2 x body parameters per token, 2 x H x V per predicted span token."""
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    body = (
        sum(p.numel() for p in model.parameters())
        - emb
        - (0 if head is model.get_input_embeddings().weight else head.numel())
    )
    tokens = sum(len(t.cond_ids) + len(t.prior_ids) for t in samples)
    span = sum(2 * t.span_len for t in samples)
    return 2.0 * body * tokens + 2.0 * head.numel() * span


def run_one(config: str, n: int, max_length: int, budget: int) -> dict:
    import torch

    from iterit.scoring.actor import load_model
    from iterit.scoring.losses import reference_scores, score_templated

    model_dir, rows = templated_samples(n, max_length)
    samples = [t for _, _, t in rows]
    tokens = sum(len(t.cond_ids) + len(t.prior_ids) for t in samples)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"config": config, "samples": len(samples), "tokens": tokens}
    if config in "de":
        return run_ray(rows, model_dir, max_length, budget, result, through_driver=config == "e")
    dtype = "bfloat16" if config == "c" else "float32"
    model = load_model(model_dir, dtype)
    score_templated(model, samples[:2], budget, pad_id=0)  # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    if config == "a":
        scores = np.array([reference_scores(model, t) for t in samples])
        ifd, padding = np.exp(scores[:, 0] - scores[:, 1]), 0.0
    else:
        s = score_templated(model, samples, budget, pad_id=0)
        ifd, padding = s.ifd, s.padding_fraction
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    rate = gemm_rate(torch.bfloat16 if config == "c" else torch.float32, device)
    result.update(
        seconds=sec,
        padding=padding,
        flops_fraction=useful_flops(model, samples) / sec / rate,
        gemm_gflops=rate / 1e9,
        ifd=[float(x) for x in ifd],
        device=device,
    )
    return result


def score_through_driver(cfg, samples_path: str, out: str) -> int:
    """The scoring path before scores were a folder: the scored rows of iterit's own Ray Dataset pulled
    through the driver (iter_batches) into one Parquet file. Returns the rows written."""
    import pyarrow.parquet as pq

    from iterit.scoring.pipeline import scoring_dataset

    writer, rows = None, 0
    for batch in scoring_dataset(cfg, samples_path, log=lambda *_: None).iter_batches(
        batch_format="pyarrow", batch_size=None
    ):
        writer = writer or pq.ParquetWriter(os.path.join(out, "scores.parquet"), batch.schema)
        writer.write_table(batch)
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    return rows


def run_ray(rows, model_dir, max_length, budget, result, through_driver: bool = False) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from iterit.config import config_from_dict
    from iterit.data import SAMPLE_SCHEMA
    from iterit.scoring.pipeline import run_scoring

    with tempfile.TemporaryDirectory() as tmp:
        # Two files, so Ray Data reads two blocks and each actor gets one (a real corpus has many).
        half = max(1, len(rows) // 2)
        os.makedirs(f"{tmp}/samples")
        for part, chunk in enumerate((rows[:half], rows[half:])):
            pq.write_table(
                pa.Table.from_pylist(
                    [
                        {"id": sid, "messages": m, "source": "bench", "row": i}
                        for i, (sid, m, _) in enumerate(chunk)
                    ],
                    schema=SAMPLE_SCHEMA,
                ),
                f"{tmp}/samples/{part}.parquet",
            )
        cfg = config_from_dict(
            {
                "base_model": model_dir,
                "datasets": [{"path": "unused"}],
                "sequence_len": max_length,
                # Two actors of one thread each; Ray's reads and templating keep 1 CPU of the 2.
                "scoring": {
                    "min_actors": 2,
                    "max_actors": 2,
                    "cpus_per_actor": 0.5,
                    "torch_threads": 1,
                    "template_cpus": 0.25,
                    "batch_size": max(1, len(rows) // 2),
                    "token_budget": budget,
                    "dtype": "float32",
                },
            }
        )
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        t0 = time.perf_counter()
        if through_driver:
            score_through_driver(cfg, f"{tmp}/samples", tmp)
            t = pq.read_table(f"{tmp}/scores.parquet", columns=["real_tokens", "computed_tokens"])
            padding = 1 - sum(t["real_tokens"].to_pylist()) / sum(t["computed_tokens"].to_pylist())
        else:
            padding = run_scoring(cfg, f"{tmp}/samples", tmp, log=lambda *_: None)["padding_fraction"]
        sec = time.perf_counter() - t0
        ray.shutdown()
    result.update(seconds=sec, padding=padding, flops_fraction=None, ifd=None)
    return result


def child(config: str, args) -> dict:
    cmd = [
        sys.executable,
        os.path.join(HERE, "bench_scoring.py"),
        "--one",
        config,
        "--n",
        str(args.n),
        "--max-length",
        str(args.max_length),
        "--budget",
        str(args.budget),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"configuration {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="samples timed per configuration")
    ap.add_argument(
        "--rank-n", type=int, default=400, help="samples for the bf16-vs-fp32 ranking check (0: none)"
    )
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--budget", type=int, default=4096, help="token budget per micro-batch")
    ap.add_argument("--configs", default="abcde", help="which of (a)-(e) to run, e.g. de; (a) always runs")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        r = run_one(args.one, args.n, args.max_length, args.budget)
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(r))
        return

    names = {
        "a": "(a) reference, bs=1, fp32",
        "b": "(b) iterit in-process fp32",
        "c": "(c) iterit in-process bf16",
        "d": "(d) Ray Data, 2 actors fp32",
        "e": "(e) (d) through the driver",
    }
    res = {}
    for c in "a" + args.configs.replace("a", ""):  # (a) always: the x (a) column is against it
        res[c] = r = child(c, args)
        if c == "a":
            print(
                f"{r['samples']} samples, {r['tokens']:,} tokens (both passes), "
                f"max_length {args.max_length}, budget {args.budget}, device {r['device']}; "
                f"GEMM fp32 {r['gemm_gflops']:.0f} GFLOP/s"
            )
            print(
                f"{'':30} {'tokens/s':>9} {'samples/s':>9} {'FLOP/GEMM':>9} {'padding':>8} "
                f"{'peak RSS MB':>11} {'x (a)':>6}"
            )
        frac = f"{r['flops_fraction']:.0%}" if r["flops_fraction"] is not None else "-"
        print(
            f"{names[c]:30} {r['tokens'] / r['seconds']:9,.0f} {r['samples'] / r['seconds']:9.2f} {frac:>9} "
            f"{r['padding']:8.1%} {r['peak_rss_mb']:11,.0f} {res['a']['seconds'] / r['seconds']:6.2f}",
            flush=True,
        )
    if "c" in res:
        print(f"GEMM rate bf16 {res['c']['gemm_gflops']:.0f} GFLOP/s (the FLOP/GEMM of (c) is against it)")
    if "b" in res and "d" in res:
        print(
            f"(d)/(b) throughput: {res['b']['seconds'] / res['d']['seconds']:.2f}"
            " (actor start-up and model load included)"
        )
    if "d" in res and "e" in res:
        print(
            f"(d)/(e) throughput, scores written by the workers against every row through the driver: "
            f"{res['e']['seconds'] / res['d']['seconds']:.2f} (target >= 1)"
        )
    if "b" in res:
        ifd_a, ifd_b = np.array(res["a"]["ifd"]), np.array(res["b"]["ifd"])
        print(f"(b) vs (a) IFD: max relative difference {np.max(np.abs(ifd_b - ifd_a) / ifd_a):.2e}")
    if not args.rank_n:
        return

    # Ranking agreement of bf16 with fp32 on more samples (in-process, one process each).
    rank = {
        c: child(c, argparse.Namespace(n=args.rank_n, max_length=args.max_length, budget=args.budget))
        for c in "bc"
    }
    fb, fc = np.array(rank["b"]["ifd"]), np.array(rank["c"]["ifd"])
    k = max(1, int(0.05 * len(fb)))
    top_b, top_c = set(np.argsort(-fb)[:k]), set(np.argsort(-fc)[:k])
    print(
        f"bf16 vs fp32 on {len(fb)} samples: Spearman {spearman(fb, fc):.4f}, top-5% ({k}) overlap "
        f"{len(top_b & top_c) / k:.0%}, median |IFD difference| {np.median(np.abs(fc - fb)):.4f}; "
        f"bf16 speed-up {rank['b']['seconds'] / rank['c']['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
