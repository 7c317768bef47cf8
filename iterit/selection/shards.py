"""Hashed TF-IDF rows on disk, built on the cluster: the iterit greedy at millions of responses.

The pure part (numpy, scipy, pyarrow; no Ray): the work of each task of the build and the reader. The
Ray Data layer that runs the tasks is selection.pipeline.build_shards.

    count_shard / sum_df_range / weight_shard   one task of each of the three passes below
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
          (greedy.initial_scores), the weighted shard written, the count shard removed.
Candidates are numbered 0..n-1 in window order (the order select_window gives them); `cand_of_row`
maps each row of the samples file to its candidate number, -1 for a sample that is not a candidate.

Layout of OUT_DIR (each shard directory is complete once its `complete` file exists, so a task retried
by Ray, or a build run again after the driver died, redoes only what is missing):
    counts/<shard>/{data,indices,indptr,cands,df_cols,df_counts}.npy, complete   counts uint16 (float32
                 in a shard with a count above 65,535)
    rows/<shard>/{data,indices,indptr,cands,initial}.npy, complete   float32 / int32 / int64 / int64 / float64
    idf.npy     the 2^24 idf (float32), saved before the first shard is weighted
    inputs.json {fingerprint}: the candidates, their IFD and the eos token the folder was built for
                (a folder of other inputs is removed, not reused)
    done.json   {candidates, shards, nnz, bytes}: the build finished
A popped row is read from its memory-mapped shard, so OUT_DIR must be a local or shared POSIX path on
the driver; rows on object storage are copied to a local directory first (ShardedRows does it).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from fsspec.implementations.local import LocalFileSystem

from iterit.io import filesystem, join
from iterit.selection.greedy import initial_scores
from iterit.selection.tfidf import HASH_FEATURES, hash_counts, response_texts, weight_inplace

ROWS_PER_TASK = 32_768  # samples per counts task: ~20M non-zeros, ~0.5 GB of task memory
DF_RANGES = 16  # column ranges of the document-frequency reduction (2^20 columns each)


def save_arrays(fs, folder: str, arrays: dict[str, np.ndarray]) -> None:
    """np.save each array into FOLDER, then the `complete` marker: a folder without it is redone."""
    fs.makedirs(folder, exist_ok=True)
    for name, a in arrays.items():
        with fs.open(join(folder, f"{name}.npy"), "wb") as f:
            np.save(f, a)
    with fs.open(join(folder, "complete"), "wb") as f:
        f.write(b"")


def load_array(fs, folder: str, name: str) -> np.ndarray:
    with fs.open(join(folder, f"{name}.npy"), "rb") as f:
        return np.load(f)


def map_array(fs, folder: str, name: str) -> np.ndarray:
    """load_array, memory-mapped where the file is local: a task that needs a slice reads only that."""
    if isinstance(fs, LocalFileSystem):
        return np.load(filesystem(join(folder, f"{name}.npy"))[1], mmap_mode="r")
    return load_array(fs, folder, name)


def is_complete(fs, folder: str) -> bool:
    return fs.exists(join(folder, "complete"))


def final_contents(messages: pa.ChunkedArray) -> list[str]:
    """The content of each sample's final message (its response), taken in Arrow: no Python dict per
    message."""
    messages = messages.combine_chunks()
    last = np.cumsum(pc.list_value_length(messages).to_numpy()) - 1
    return messages.flatten().field("content").take(pa.array(last)).to_pylist()


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
    if is_complete(fs, folder) or is_complete(fs, done):
        return int(load_array(fs, folder if is_complete(fs, folder) else done, "cands").size)
    sfs, sp_path = filesystem(samples_path)
    with sfs.open(sp_path, "rb") as f:
        table = pq.ParquetFile(f).read_row_groups(task["groups"], columns=["messages"])
    cands = cand_of_row[task["offset"] : task["offset"] + table.num_rows]
    keep = np.flatnonzero(cands >= 0)
    if keep.size == 0:
        return 0
    responses = final_contents(table.column("messages").take(pa.array(keep)))
    counts = hash_counts(response_texts(responses, eos_token))
    df_cols, df_counts = np.unique(counts.indices, return_counts=True)
    # Whole counts: uint16 holds them exactly (float32 where a count passes 65,535): the build is
    # disk-bound, and this shard is written once and read once.
    small = counts.data.size == 0 or counts.data.max() <= np.iinfo(np.uint16).max
    save_arrays(
        fs,
        folder,
        {
            "data": counts.data.astype(np.uint16) if small else counts.data,
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
        cols, cnt = map_array(fs, folder, "df_cols"), map_array(fs, folder, "df_counts")
        a, b = np.searchsorted(cols, [lo, hi])
        df += np.bincount(cols[a:b] - lo, weights=cnt[a:b], minlength=width).astype(np.int64)
    return df


def weight_shard(shard: str, out_dir: str, idf: np.ndarray, cand_ifd: np.ndarray) -> int:
    """Pass 3 for one shard: counts -> TF-IDF rows with the whole matrix's idf, the rows' initial scores,
    written to rows/<shard>; the count shard removed. Returns the shard's non-zeros."""
    fs, _ = filesystem(out_dir)
    src, dst = join(out_dir, "counts", shard), join(out_dir, "rows", shard)
    if not is_complete(fs, dst):
        cands = load_array(fs, src, "cands")
        counts = load_array(fs, src, "data").astype(np.float32, copy=False)
        x = sp.csr_matrix(
            (counts, load_array(fs, src, "indices"), load_array(fs, src, "indptr")),
            shape=(cands.size, HASH_FEATURES),
        )
        weight_inplace(x, idf=idf)
        ip, ix, d = x.indptr, x.indices, x.data
        initial = initial_scores(cand_ifd[cands], x)
        save_arrays(fs, dst, {"data": d, "indices": ix, "indptr": ip, "cands": cands, "initial": initial})
    if fs.exists(src):
        fs.rm(src, recursive=True)
    return int(map_array(fs, dst, "indptr")[-1])


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
            # Plain ndarray views of the maps: slicing a np.memmap builds a memmap object per row.
            arrays = [
                np.load(os.path.join(folder, f"{a}.npy"), mmap_mode="r").view(np.ndarray)
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
