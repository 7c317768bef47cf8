"""Ingest throughput and memory on a large JSONL, against the floor of reading and parsing it.

    python benchmarks/bench_ingest.py --gb 1.0

Builds a JSONL of real ShareGPT conversations (the demo corpus, repeated with fresh ids) of the given
size, then measures in separate processes:
  floor:  read every line and json.loads it (what any ingest must do at least)
  ingest: iterit's ingest (normalise, ids, duplicate check, rejects, Parquet)
and prints seconds, MB/s, rows/s, peak RSS and ingest/floor ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = """
import json, sys, time
t = time.perf_counter(); n = 0
with open(sys.argv[1], 'rb') as f:
    for line in f:
        json.loads(line); n += 1
print(json.dumps({"rows": n, "seconds": time.perf_counter() - t}))
"""

INGEST = """
import json, sys, time
from iterit.config import DatasetConfig
from iterit.data import ingest
t = time.perf_counter()
s = ingest([DatasetConfig(path=sys.argv[1])], sys.argv[2])
print(json.dumps({"rows": s["read"], "accepted": s["accepted"], "seconds": time.perf_counter() - t}))
"""


def build_corpus(path: Path, gigabytes: float) -> int:
    from iterit.demo import prepare_demo

    rows = [json.loads(line) for line in open(prepare_demo()["train"], encoding="utf-8")]
    target, written, n = gigabytes * 1e9, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rec = rows[n % len(rows)]
            line = (
                json.dumps({"id": f"bench-{n}", "conversations": rec["conversations"]}, ensure_ascii=False)
                + "\n"
            )
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def measure(code: str, *args: str) -> dict:
    """Run in a fresh process; report its own result plus its peak RSS."""
    wrapped = code + "\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", wrapped, *args], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    return {**json.loads(lines[-2]), "peak_rss_mb": int(lines[-1]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="corpus size in GB")
    ap.add_argument("--workdir", default=None, help="where to build the corpus (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        t = time.perf_counter()
        n = build_corpus(corpus, args.gb)
        size_mb = corpus.stat().st_size / 1e6
        print(f"corpus: {n:,} ShareGPT rows, {size_mb:,.0f} MB (built in {time.perf_counter() - t:.0f} s)")
        floor = measure(FLOOR, str(corpus))
        ing = measure(INGEST, str(corpus), str(Path(tmp) / "out"))
        out_mb = os.path.getsize(Path(tmp) / "out" / "samples.parquet") / 1e6
    print(f"{'':8} {'seconds':>8} {'MB/s':>7} {'rows/s':>9} {'peak RSS MB':>12}")
    for name, r in (("floor", floor), ("ingest", ing)):
        print(
            f"{name:8} {r['seconds']:8.1f} {size_mb / r['seconds']:7.1f} {r['rows'] / r['seconds']:9,.0f} "
            f"{r['peak_rss_mb']:12,.0f}"
        )
    print(
        f"ingest / floor time: {ing['seconds'] / floor['seconds']:.2f}x; "
        f"peak RSS / input size: {ing['peak_rss_mb'] / size_mb:.3f}; "
        f"accepted {ing['accepted']:,} of {ing['rows']:,}; samples.parquet {out_mb:,.0f} MB"
    )


if __name__ == "__main__":
    main()
