"""Hashed TF-IDF rows on disk, built on the cluster: the iterit greedy at millions of responses.

    build_shards(samples_path, cand_of_row, cand_ifd, out_dir, eos_token)   Ray Data, three passes
    ShardedRows(out_dir)   the weighted rows memory-mapped: row(c) -> (indices, data), initial scores

The matrix is the one tfidf_matrix(texts, "hashed") builds in memory, row for row and bit for bit
(a test holds the greedy's picks and gains to the in-memory ones), but no process ever holds it:
  counts  one task per group of the samples' Parquet row groups: the candidates' responses (+ eos) ->
          hashed 1-3-gram counts (tfidf.hash_counts), written as a count shard with its sorted
          document frequencies;
  df      one task per column range: that range of every shard's document frequencies, summed. The
          driver receives the 2^24 document frequencies (128 MB whatever N) and nothing else of the matrix;
  weight  one task per shard: idf and l2 norm (tfidf.weight_inplace with the whole matrix's idf: a row's
          weights depend on that row and the idf only), each row's initial greedy score
          (greedy.row_score), the weighted shard written, the count shard removed.
Candidates are numbered 0..n-1 in window order (the order select_window gives them); `cand_of_row`
maps each row of the samples file to its candidate number, -1 for a sample that is not a candidate.

Layout of OUT_DIR (each shard directory is complete once its `complete` file exists, so a task retried
by Ray, or a build run again after the driver died, redoes only what is missing):
    counts/<shard>/{data,indices,indptr,cands,df_cols,df_counts}.npy, complete
    rows/<shard>/{data,indices,indptr,cands,initial}.npy, complete   float32 / int32 / int64 / int64 / float64
    idf.npy     the 2^24 idf (float32), saved before the first shard is weighted
    done.json   {candidates, shards, nnz, bytes}: the build finished
A popped row is read from its memory-mapped shard, so OUT_DIR must be a local or shared POSIX path on
the driver; rows on object storage are copied to a local directory first (ShardedRows does it).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from fsspec.implementations.local import LocalFileSystem

from iterit.io import atomic_open, atomic_write_text, filesystem, join
from iterit.selection.greedy import row_score
from iterit.selection.tfidf import HASH_FEATURES, hash_counts, response_texts, smooth_idf, weight_inplace

ROWS_PER_TASK = 32_768  # samples per counts task: ~20M non-zeros, ~0.5 GB of task memory
DF_RANGES = 16  # column ranges of the document-frequency reduction (2^20 columns each)


def _save(fs, folder: str, arrays: dict[str, np.ndarray]) -> None:
    """np.save each array into FOLDER, then the `complete` marker: a folder without it is redone."""
    fs.makedirs(folder, exist_ok=True)
    for name, a in arrays.items():
        with fs.open(join(folder, f"{name}.npy"), "wb") as f:
            np.save(f, a)
    with fs.open(join(folder, "complete"), "wb") as f:
        f.write(b"")


def _load(fs, folder: str, name: str) -> np.ndarray:
    with fs.open(join(folder, f"{name}.npy"), "rb") as f:
        return np.load(f)


def _complete(fs, folder: str) -> bool:
    return fs.exists(join(folder, "complete"))


def task_groups(samples_path: str, rows_per_task: int = ROWS_PER_TASK) -> list[dict]:
    """The samples file's row groups gathered into tasks of about rows_per_task rows: [{shard, groups,
    offset}] with each task's first row. Read from the Parquet footer only."""
    fs, p = filesystem(samples_path)
    with fs.open(p, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    tasks, groups, offset, rows = [], [], 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= rows_per_task or g == meta.num_row_groups - 1:
            tasks.append({"shard": f"{len(tasks):06d}", "groups": groups, "offset": offset})
            offset, groups, rows = offset + rows, [], 0
    return tasks


def count_shard(task: dict, samples_path: str, out_dir: str, cand_of_row: np.ndarray, eos_token: str | None):
    """Pass 1 for one task (pure but for the files): its candidates' hashed counts and document
    frequencies, written to counts/<shard>. Returns the number of candidates it holds."""
    fs, _ = filesystem(out_dir)
    folder, done = join(out_dir, "counts", task["shard"]), join(out_dir, "rows", task["shard"])
    if _complete(fs, folder) or _complete(fs, done):
        return int(_load(fs, folder if _complete(fs, folder) else done, "cands").size)
    sfs, sp_path = filesystem(samples_path)
    with sfs.open(sp_path, "rb") as f:
        table = pq.ParquetFile(f).read_row_groups(task["groups"], columns=["messages"])
    cands = cand_of_row[task["offset"] : task["offset"] + table.num_rows]
    keep = np.flatnonzero(cands >= 0)
    if keep.size == 0:
        return 0
    messages = table.column("messages").take(pa.array(keep)).to_pylist()
    counts = hash_counts(response_texts([m[-1]["content"] for m in messages], eos_token))
    counts.sum_duplicates()
    df_cols, df_counts = np.unique(counts.indices, return_counts=True)
    _save(
        fs,
        folder,
        {
            "data": counts.data,
            "indices": counts.indices.astype(np.int32),
            "indptr": counts.indptr.astype(np.int64),
            "cands": cands[keep].astype(np.int64),
            "df_cols": df_cols.astype(np.int32),
            "df_counts": df_counts.astype(np.int32),
        },
    )
    return int(keep.size)


def sum_df_range(r: int, out_dir: str, shards: list[str], ranges: int = DF_RANGES) -> np.ndarray:
    """Pass 2 for one column range: the document frequencies of columns [r, r + 1) x 2^24 / ranges,
    summed over every count shard (each shard's sorted columns sliced by binary search)."""
    fs, _ = filesystem(out_dir)
    width = HASH_FEATURES // ranges
    lo, hi = r * width, (r + 1) * width
    df = np.zeros(width, dtype=np.int64)
    for s in shards:
        folder = join(out_dir, "counts", s)
        cols, cnt = _load(fs, folder, "df_cols"), _load(fs, folder, "df_counts")
        a, b = np.searchsorted(cols, [lo, hi])
        np.add.at(df, cols[a:b] - lo, cnt[a:b])
    return df


def weight_shard(shard: str, out_dir: str, idf: np.ndarray, cand_ifd: np.ndarray) -> int:
    """Pass 3 for one shard: counts -> TF-IDF rows with the whole matrix's idf, the rows' initial scores,
    written to rows/<shard>; the count shard removed. Returns the shard's non-zeros."""
    fs, _ = filesystem(out_dir)
    src, dst = join(out_dir, "counts", shard), join(out_dir, "rows", shard)
    if not _complete(fs, dst):
        cands = _load(fs, src, "cands")
        x = sp.csr_matrix(
            (_load(fs, src, "data"), _load(fs, src, "indices"), _load(fs, src, "indptr")),
            shape=(cands.size, HASH_FEATURES),
        )
        weight_inplace(x, idf=idf)
        ip, ix, d = x.indptr, x.indices, x.data
        ifd = cand_ifd[cands]
        initial = np.array(
            [row_score(ifd[i], d[ip[i] : ip[i + 1]], ix[ip[i] : ip[i + 1]], None) for i in range(x.shape[0])]
        )
        _save(fs, dst, {"data": d, "indices": ix, "indptr": ip, "cands": cands, "initial": initial})
    if fs.exists(src):
        fs.rm(src, recursive=True)
    return int(_load(fs, dst, "indptr")[-1])


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
    (done.json) is reused; an unfinished one is completed. Returns done.json's record."""
    import ray

    fs, _ = filesystem(out_dir)
    done_path = join(out_dir, "done.json")
    if fs.exists(done_path):
        with fs.open(done_path, "r") as f:
            return json.load(f)
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
        return {"shard": [t["shard"] for t in todo], "cands": held}

    items = [json.dumps(t) for t in tasks]
    held = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(counts, batch_size=1)
    shards = [r["shard"] for r in held.take_all() if r["cands"] > 0]

    def dfs(batch: dict) -> dict:
        return {"r": batch["item"], "df": [sum_df_range(int(r), out_dir, shards) for r in batch["item"]]}

    idf_path = join(out_dir, "idf.npy")  # saved before any shard is weighted (their counts then go)
    if fs.exists(idf_path):
        idf = _load(fs, out_dir, "idf")
    else:
        df = np.zeros(HASH_FEATURES, dtype=np.int64)
        width = HASH_FEATURES // DF_RANGES
        ranges = ray.data.from_items(list(range(DF_RANGES)), override_num_blocks=DF_RANGES)
        for row in ranges.map_batches(dfs, batch_size=1).iter_rows():
            df[row["r"] * width : (row["r"] + 1) * width] = row["df"]
        idf = smooth_idf(df, n)
        with atomic_open(idf_path) as f:
            np.save(f, idf)
    idf_ref = ray.put(idf)

    def weight(batch: dict) -> dict:
        return {"nnz": [weight_shard(s, out_dir, ray.get(idf_ref), ray.get(ifd_ref)) for s in batch["item"]]}

    weighted = ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))
    nnz = sum(r["nnz"] for r in weighted.map_batches(weight, batch_size=1).take_all())
    record = {
        "candidates": n,
        "shards": len(shards),
        "nnz": int(nnz),
        "bytes": int(fs.du(join(out_dir, "rows"))),
    }
    if fs.exists(join(out_dir, "counts")):
        fs.rm(join(out_dir, "counts"), recursive=True)
    atomic_write_text(done_path, json.dumps(record) + "\n")
    return record


class ShardedRows:
    """The weighted rows of OUT_DIR, memory-mapped: row(c) -> (indices, data) of candidate c, and
    `initial`, every candidate's initial score. What stays in memory: initial (8 bytes per candidate)
    and two index arrays (12 bytes per candidate); the rows are paged in as the greedy pops them."""

    def __init__(self, out_dir: str, n: int):
        fs, p = filesystem(out_dir)
        if not isinstance(fs, LocalFileSystem):  # object storage: a local copy to memory-map
            local = tempfile.mkdtemp(prefix="iterit-tfidf-")
            fs.get(join(out_dir, "rows"), os.path.join(local, "rows"), recursive=True)
            p = local
        root = os.path.join(p, "rows")
        self.shards = []
        self.initial = np.full(n, np.nan)
        self.shard_of = np.full(n, -1, dtype=np.int32)
        self.local_of = np.zeros(n, dtype=np.int64)
        for s, name in enumerate(sorted(os.listdir(root))):
            folder = os.path.join(root, name)
            arrays = [
                np.load(os.path.join(folder, f"{a}.npy"), mmap_mode="r")
                for a in ("indptr", "indices", "data")
            ]
            self.shards.append(arrays)
            cands = np.load(os.path.join(folder, "cands.npy"))
            self.shard_of[cands], self.local_of[cands] = s, np.arange(cands.size)
            self.initial[cands] = np.load(os.path.join(folder, "initial.npy"))
        if (self.shard_of < 0).any():
            raise ValueError(
                f"{out_dir}: {(self.shard_of < 0).sum():,} candidates have no row (an incomplete build)"
            )
        self.n_terms = HASH_FEATURES

    def row(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        indptr, indices, data = self.shards[self.shard_of[c]]
        local = self.local_of[c]
        a, b = indptr[local], indptr[local + 1]
        return indices[a:b], data[a:b]
