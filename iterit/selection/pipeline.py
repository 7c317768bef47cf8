"""The Ray Data layer of selection: the hashed TF-IDF rows of a window's candidates built by the
cluster's CPUs (the tasks themselves, and the files they write, are selection.shards).

    build_shards(samples_path, cand_of_row, cand_ifd, out_dir, eos_token)   three passes, resumable
"""

from __future__ import annotations

import ctypes
import hashlib
import json

import numpy as np

from iterit.io import atomic_open, atomic_write_text, filesystem, join
from iterit.selection.shards import (
    DF_RANGES,
    ROWS_PER_TASK,
    count_shard,
    load_array,
    sum_df_range,
    task_groups,
    weight_shard,
)
from iterit.selection.tfidf import HASH_FEATURES, smooth_idf


def _return_freed_memory() -> None:
    """glibc keeps a task's freed arrays in its heap (its mmap threshold rises after large frees), and
    Ray's worker processes outlive their tasks: at N = 1M, three idle workers held ~2 GB between passes.
    malloc_trim hands the free pages back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def inputs_fingerprint(cand_of_row: np.ndarray, cand_ifd: np.ndarray, eos_token: str | None) -> str:
    """What the rows depend on: which samples are candidates in which order, their IFD (the initial
    scores) and the eos token. A folder left by a build of other inputs is never reused."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(cand_of_row, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(cand_ifd, dtype=np.float64).tobytes())
    h.update(repr(eos_token).encode())
    return h.hexdigest()


def build_shards(
    samples_path: str,
    cand_of_row: np.ndarray,
    cand_ifd: np.ndarray,
    out_dir: str,
    eos_token: str | None,
    rows_per_task: int = ROWS_PER_TASK,
    log=print,
) -> dict:
    """The hashed TF-IDF rows of the candidates, on the cluster (module docstring). A finished OUT_DIR
    (done.json) is reused and an unfinished one completed, when both were built for the same inputs
    (inputs.json); a folder of other inputs is removed first. Returns done.json's record."""
    import ray

    fs, _ = filesystem(out_dir)
    inputs = inputs_fingerprint(cand_of_row, cand_ifd, eos_token)
    inputs_path, done_path = join(out_dir, "inputs.json"), join(out_dir, "done.json")
    if fs.exists(out_dir):
        held = json.loads(fs.cat_file(inputs_path)) if fs.exists(inputs_path) else {}
        if held.get("fingerprint") != inputs:  # another window, other scores: nothing of it is ours
            log(f"  TF-IDF rows in {out_dir} were built for other candidates: rebuilt")
            fs.rm(out_dir, recursive=True)
    if fs.exists(done_path):
        with fs.open(done_path, "r") as f:
            return json.load(f)
    fs.makedirs(out_dir, exist_ok=True)
    atomic_write_text(inputs_path, json.dumps({"fingerprint": inputs}) + "\n")
    n = int(cand_ifd.size)
    cand_ref, ifd_ref = (
        ray.put(np.asarray(cand_of_row, dtype=np.int64)),
        ray.put(np.asarray(cand_ifd, np.float64)),
    )
    tasks = task_groups(samples_path, rows_per_task)
    log(f"  TF-IDF on the cluster: {n:,} candidates, {len(tasks)} count tasks, {DF_RANGES} df ranges")

    # Items are JSON strings: Ray Data would turn dict items into columns.
    def counts(batch: dict) -> dict:
        todo = [json.loads(t) for t in batch["item"]]
        held = [count_shard(t, samples_path, out_dir, ray.get(cand_ref), eos_token) for t in todo]
        _return_freed_memory()
        return {"shard": [t["shard"] for t in todo], "cands": held}

    items = [json.dumps(t) for t in tasks]
    held = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(counts, batch_size=1)
    shards = [r["shard"] for r in held.take_all() if r["cands"] > 0]

    def dfs(batch: dict) -> dict:
        df = [sum_df_range(int(r), out_dir, shards) for r in batch["item"]]
        _return_freed_memory()
        return {"r": batch["item"], "df": df}

    idf_path = join(out_dir, "idf.npy")  # saved before any shard is weighted
    if fs.exists(idf_path):
        idf = load_array(fs, out_dir, "idf")
    else:
        df = np.zeros(HASH_FEATURES, dtype=np.int64)
        width = HASH_FEATURES // DF_RANGES
        ranges = ray.data.from_items(list(range(DF_RANGES)), override_num_blocks=DF_RANGES)
        for row in ranges.map_batches(dfs, batch_size=1).iter_rows():
            df[row["r"] * width : (row["r"] + 1) * width] = row["df"]
        idf = smooth_idf(df, n)
        with atomic_open(idf_path) as f:
            np.save(f, idf)
    idf_ref = ray.put(idf.astype(np.float64))  # the weights' precision (selection.coded)

    def weight(batch: dict) -> dict:
        nnz = [weight_shard(s, out_dir, ray.get(idf_ref), ray.get(ifd_ref)) for s in batch["item"]]
        _return_freed_memory()
        return {"nnz": nnz}

    weighted = ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))
    nnz = sum(r["nnz"] for r in weighted.map_batches(weight, batch_size=1).take_all())
    record = {
        "candidates": n,
        "shards": len(shards),
        "nnz": int(nnz),
        "bytes": int(fs.du(out_dir)),
    }
    atomic_write_text(done_path, json.dumps(record) + "\n")
    return record
