"""Selection speed and exactness: the official greedy loop against iterit's lazy greedy.

    python benchmarks/bench_selection.py                     # N = 10,000 and 50,000, then 1,000,000
    python benchmarks/bench_selection.py --sizes 10000 --skip-1m
    python benchmarks/bench_selection.py --cluster 1000000   # the hashed path on the cluster at N
    python benchmarks/bench_selection.py --select 1000000    # the whole selection stage at N

Corpus: real text. Up to the ~67,000 ShareGPT assistant turns of the demo corpus, responses are those
turns; beyond that (the 1M run) each response is 3-30 sentences drawn (seeded) from all of those
turns' sentences. IFD scores are given: uniform in [0.3, 1.0), seeded. k = 5% of N, decay 0.1.

Per N: the greedy alone on the same TF-IDF matrix (reference loop vs lazy), the same end to end
(TF-IDF included), identical picks yes/no; at N = 50,000 the agreement of hashed with exact TF-IDF
(Jaccard of the selected sets, Spearman of the full orders). Then the 1M run in a fresh process:
seconds and peak RSS. The reference loop is the official algorithm with its per-element row reset
done by index arithmetic, so it is if anything faster than the official code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def assistant_turns() -> list[str]:
    from iterit.demo import prepare_demo

    out = []
    for line in open(prepare_demo(log=lambda *_: None)["train"], encoding="utf-8"):
        for turn in json.loads(line).get("conversations", []):
            if (
                turn.get("from") in ("gpt", "chatgpt", "bard", "bing")
                and isinstance(turn.get("value"), str)
                and turn["value"].strip()
            ):
                out.append(turn["value"])
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    turns = assistant_turns()
    if n <= len(turns):
        return random.Random(seed).sample(turns, n)
    sentences = [s for t in turns for s in re.split(r"(?<=[.!?])\s+|\n+", t) if len(s) > 20]
    rng = random.Random(seed)
    # 3-30 sentences: about the mean length of the real turns (1,356 characters)
    return [" ".join(rng.choices(sentences, k=rng.randint(3, 30))) for _ in range(n)]


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def one_size(n: int, run_reference: bool) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from iterit.selection.greedy import lazy_greedy, reference_greedy
    from iterit.selection.tfidf import response_texts, tfidf_matrix

    texts = response_texts(corpus(n), "<|im_end|>")
    ifd = np.random.default_rng(1).uniform(0.3, 1.0, size=n)
    k = n // 20
    t = time.perf_counter()
    x_ref = TfidfVectorizer(ngram_range=(1, 3)).fit_transform(texts)
    tfidf_ref = time.perf_counter() - t
    t = time.perf_counter()
    x = tfidf_matrix(texts, "exact")
    tfidf_ours = time.perf_counter() - t
    t = time.perf_counter()
    picks, _ = lazy_greedy(ifd, x, k, 0.1)
    lazy = time.perf_counter() - t
    line = (
        f"N={n:,} k={k:,} nnz={x.nnz:,} terms={x.shape[1]:,}: TF-IDF {tfidf_ours:.1f} s; lazy greedy "
        f"{lazy:.2f} s"
    )
    if run_reference:
        t = time.perf_counter()
        ref_picks, _ = reference_greedy(ifd, x_ref, k, 0.1)
        ref = time.perf_counter() - t
        line += (
            f"; reference loop {ref:.1f} s; greedy {ref / lazy:,.0f}x, end to end "
            f"{(tfidf_ref + ref) / (tfidf_ours + lazy):.1f}x; identical picks: "
            f"{'yes' if ref_picks == picks else 'NO'}"
        )
    print(line, flush=True)
    if n == 50_000:
        from iterit.selection.window import select_window

        t = time.perf_counter()
        hashed = select_window(ifd, k, "iterit", responses=texts, tfidf_mode="hashed")
        th = time.perf_counter() - t
        exact = select_window(ifd, k, "iterit", responses=texts, tfidf_mode="exact")
        pos_h, pos_e = np.empty(n), np.empty(n)
        pos_h[hashed.order], pos_e[exact.order] = np.arange(n), np.arange(n)
        jac = len(set(hashed.picks) & set(exact.picks)) / len(set(hashed.picks) | set(exact.picks))
        print(
            f"hashed vs exact TF-IDF at N={n:,}: Jaccard of selected sets {jac:.3f}, Spearman of the orders "
            f"{spearman(pos_h, pos_e):.4f}, same first 100 picks in order: "
            f"{sum(a == b for a, b in zip(hashed.picks[:100], exact.picks[:100]))}/100; hashed end to end "
            f"{th:.1f} s",
            flush=True,
        )


def million(n: int, mode: str) -> None:
    import threading

    import psutil

    from iterit.selection.window import select_window

    texts = corpus(n)
    ifd = np.random.default_rng(1).uniform(0.3, 1.0, size=n)
    peak, done = [0], threading.Event()

    def sample_tree_rss():  # this process and its TF-IDF workers, summed: what the machine must hold
        me = psutil.Process()
        while not done.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    watcher = threading.Thread(target=sample_tree_rss, daemon=True)
    watcher.start()
    t = time.perf_counter()
    wo = select_window(ifd, n // 20, "iterit", responses=texts, eos_token="<|im_end|>", tfidf_mode=mode)
    sec = time.perf_counter() - t
    done.set()
    print(
        f"N={n:,} k={len(wo.picks):,} ({mode} TF-IDF): selection {sec:.0f} s (corpus building excluded), "
        f"peak RSS of the process and its workers together {peak[0] / 1024**3:.1f} GiB; mean response "
        f"{sum(map(len, texts)) / n:,.0f} characters",
        flush=True,
    )


def write_corpus(path: str, n: int, seed: int = 0, chunk: int = 4096) -> None:
    """corpus(n)'s recombined demo sentences as an ingested samples file, written a row group at a time:
    the benchmark never holds the N texts (10M responses are ~13 GB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iterit.data import SAMPLE_SCHEMA

    turns = assistant_turns()
    sentences = [s for t in turns for s in re.split(r"(?<=[.!?])\s+|\n+", t) if len(s) > 20]
    rng = random.Random(seed)
    with pq.ParquetWriter(path, SAMPLE_SCHEMA, compression="zstd") as w:
        for a in range(0, n, chunk):
            rows = [
                {
                    "id": f"s{i}",
                    "messages": [
                        {"role": "user", "content": "q"},
                        {
                            "role": "assistant",
                            "content": " ".join(rng.choices(sentences, k=rng.randint(3, 30))),
                        },
                    ],
                    "source": "bench",
                    "row": i,
                }
                for i in range(a, min(n, a + chunk))
            ]
            w.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))


def cluster_run(n: int, work: str) -> None:
    """iterit's hashed path end to end at N: the TF-IDF rows built by Ray Data on this machine's CPUs,
    then the greedy over the memory-mapped rows; memory of every process together (benchmarks/memwatch)."""
    from memwatch import MemoryWatch

    from iterit import cluster
    from iterit.io import filesystem
    from iterit.selection.greedy import lazy_greedy_coded
    from iterit.selection.stage import diversity_inputs, pick_progress, remove_tfidf
    from iterit.selection.window import select_window

    samples = os.path.join(work, f"samples-{n}.parquet")
    if not os.path.exists(samples):
        t = time.perf_counter()
        write_corpus(samples, n)
        print(
            f"corpus of {n:,} written in {time.perf_counter() - t:.0f} s "
            f"({os.path.getsize(samples) / 2**30:.2f} GiB)"
        )
    ifd = np.random.default_rng(1).uniform(0.3, 1.0, size=n)
    tfidf = os.path.join(work, f"tfidf-{n}")
    remove_tfidf(tfidf)
    with MemoryWatch() as mem:
        t0 = time.perf_counter()
        cluster.connect()
        div = diversity_inputs(samples, np.arange(n), ifd, "iterit", "hashed", tfidf, "<|im_end|>", log=print)
        t1 = time.perf_counter()
        fs, _ = filesystem(tfidf)
        disk = fs.du(tfidf)
        mem.phase("greedy")
        with pick_progress(n // 20, "iterit") as on_picks:  # picks/s and an ETA every 10 s on stderr
            wo = select_window(ifd, n // 20, "iterit", on_picks=on_picks, **div)
        t2 = time.perf_counter()
    by = mem.run_peak_mb_of
    print(
        f"N={n:,} k={len(wo.picks):,} (hashed TF-IDF on the cluster): {t2 - t0:.0f} s end to end (Ray "
        f"start and TF-IDF rows {t1 - t0:.0f} s, greedy {t2 - t1:.0f} s, {len(wo.picks) / (t2 - t1):,.0f} "
        f"picks/s, {lazy_greedy_coded.rescored / len(wo.picks):.0f} re-evaluations a pick); "
        f"memory of every process together (machine used memory above before) {mem.run_peak_mb / 1024:.1f} "
        f"GiB (rows {by['run'] / 1024:.1f}, greedy {by['greedy'] / 1024:.1f}), driver peak RSS "
        f"{mem.driver_peak_mb / 1024:.1f} GiB; rows on disk {disk / 2**30:.1f} GiB",
        flush=True,
    )
    remove_tfidf(tfidf)


def select_stage_run(n: int, work: str) -> None:
    """The selection stage as `iterit select` runs it after ingest (selection.stage.run_selection): ids
    and scores read from files, the TF-IDF rows built on the cluster, the greedy, selection.jsonl and
    order.parquet written; memory of every process together (benchmarks/memwatch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from memwatch import MemoryWatch

    from iterit import cluster
    from iterit.selection.stage import run_selection

    samples = os.path.join(work, f"samples-{n}.parquet")
    if not os.path.exists(samples):
        write_corpus(samples, n)
    scores = os.path.join(work, f"scores-{n}.parquet")
    ifd = np.random.default_rng(1).uniform(0.3, 1.0, size=n)
    ids = pq.read_table(samples, columns=["id"]).column("id")
    pq.write_table(pa.table({"id": ids, "ifd": ifd}), scores)
    del ids
    out = os.path.join(work, f"select-{n}")
    with MemoryWatch() as mem:
        t0 = time.perf_counter()
        cluster.connect()
        got = run_selection(
            samples, scores, lambda m: m // 20, "iterit", out, eos_token="<|im_end|>", tfidf_mode="hashed"
        )
        sec = time.perf_counter() - t0
    print(
        f"N={n:,} k={got['k']:,} through the selection stage (run_selection: ids, scores, cluster TF-IDF, "
        f"greedy, outputs written): {sec:.0f} s, memory of every process together (machine used memory "
        f"above before) {mem.run_peak_mb / 1024:.1f} GiB, driver peak RSS "
        f"{mem.driver_peak_mb / 1024:.1f} GiB",
        flush=True,
    )


def embedding_run(n: int, k: int, dim: int, dtype: str) -> None:
    """The embedding method at scale, on clustered synthetic unit vectors (200 topics + noise) stored as
    scoring stores them (--embedding-dim, --embedding-dtype): the cost is the blocked products, which do
    not depend on where the vectors come from. Built a block at a time (no float32 copy of the whole)."""
    import torch

    from iterit.selection.embedding import lazy_embedding_greedy, products_device

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, dim)).astype(np.float32)
    emb = np.empty((n, dim), dtype=dtype)
    for a in range(0, n, 262_144):
        b = min(n, a + 262_144)
        noise = rng.standard_normal((b - a, dim)).astype(np.float32)
        part = centers[rng.integers(0, 200, b - a)] + 0.7 * noise
        emb[a:b] = part / np.linalg.norm(part, axis=1, keepdims=True)
    ifd = rng.uniform(0.3, 1.0, n)
    dev = products_device(None)
    t = time.perf_counter()
    picks, _ = lazy_embedding_greedy(ifd, emb, k)
    s = time.perf_counter() - t
    flops = 2.0 * n * dim * len(picks)
    print(
        f"embedding method N={n:,} k={len(picks):,} d={dim} {dtype} (products on {dev}, "
        f"{torch.get_num_threads()} torch threads): {s:.0f} s, {flops / s / 1e9:.0f} GFLOP/s of blocked "
        f"products over the whole run ({flops / 1e12:.1f} TFLOP), peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.1f} GiB (embeddings "
        f"{emb.nbytes / 2**30:.2f} GiB)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,50000")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-1m", action="store_true")
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument(
        "--big-mode", default="auto", help="TF-IDF mode of the big run (auto: hashed above 200,000)"
    )
    ap.add_argument("--only-big", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="only iterit's cluster-built hashed path at N (corpus streamed to --work, reused across runs)",
    )
    ap.add_argument(
        "--work", default=os.path.join(os.path.expanduser("~"), ".cache", "iterit", "bench-selection")
    )
    ap.add_argument(
        "--select", type=int, metavar="N", help="only the selection stage (`iterit select` after ingest) at N"
    )
    ap.add_argument("--embedding", action="store_true", help="only the embedding method at --big, k = 5%%")
    ap.add_argument("--embedding-dim", type=int, default=256)
    ap.add_argument("--embedding-dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args()
    if args.embedding:
        embedding_run(args.big, args.big // 20, args.embedding_dim, args.embedding_dtype)
        return
    if args.select:
        os.makedirs(args.work, exist_ok=True)
        select_stage_run(args.select, args.work)
        return
    if args.cluster:
        os.makedirs(args.work, exist_ok=True)
        cluster_run(args.cluster, args.work)
        return
    if args.only_big:
        million(args.big, args.big_mode)
        return
    for n in map(int, args.sizes.split(",")):
        one_size(n, not args.skip_reference)
    if not args.skip_1m:
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--only-big",
                "--big",
                str(args.big),
                "--big-mode",
                args.big_mode,
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
