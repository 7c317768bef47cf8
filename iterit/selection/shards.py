"""Hashed TF-IDF rows on disk, built on the cluster: the iterit greedy at millions of responses.

The pure part (numpy, pyarrow; no Ray): the work of each task of the build and the reader. The Ray
Data layer that runs the tasks is selection.pipeline.build_shards.

    count_shard / sum_df_range / weight_shard   one task of each of the three passes below
    sharded_rows(out_dir, n)   the coded rows memory-mapped, as selection.coded.CodedRows

The rows are coded counts (selection.coded: 3 bytes a non-zero; the weights are counts x idf / norm,
computed where they are used), and they are the same rows, bit for bit, that coded_rows builds in
memory for the same candidates (a test holds the greedy's picks and gains to the in-memory ones), but
no process ever holds all of them:
  counts  one task per group of the samples' Parquet row groups: the candidates' responses (+ eos) ->
          hashed 1-3-gram counts (tfidf.hash_counts), coded and written as a row shard with its sorted
          document frequencies;
  df      one task per column range: that range of every shard's document frequencies, summed. The
          driver receives the 2^24 document frequencies (128 MB whatever N) and nothing else of the matrix;
  weight  one task per shard: each row's l2 norm under the whole matrix's idf and its initial greedy
          score (a row's norm depends on that row and the idf only), written beside the rows.
Candidates are numbered 0..n-1 in window order (the order select_window gives them); `cand_of_row`
maps each row of the samples file to its candidate number, -1 for a sample that is not a candidate.

Layout of OUT_DIR (each shard directory is complete once its `complete` file exists, so a task retried
by Ray, or a build run again after the driver died, redoes only what is missing):
    rows/<shard>/{starts,codes,cands,df_cols,df_counts}.npy, complete   int64 / uint8 / int64 / int32 / int32
                 (df_cols and df_counts removed once the shard is weighted)
    weights/<shard>/{norms,initial,nnz}.npy, complete   float64 / float64 / int64 (one value)
    idf.npy     the 2^24 idf (float32), saved before the first shard is weighted
    inputs.json {fingerprint}: the candidates, their IFD and the eos token the folder was built for
                (a folder of other inputs is removed, not reused)
    done.json   {candidates, shards, nnz, bytes}: the build finished
A popped row is read from its memory-mapped shard, so OUT_DIR must be a local or shared POSIX path on
the driver; rows on object storage are copied to a local directory first (sharded_rows does it).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from iterit.io import filesystem, join
from iterit.selection.coded import CodedRows, encode_counts, norms_and_scores
from iterit.selection.tfidf import HASH_FEATURES, hash_counts, response_texts

ROWS_PER_TASK = 32_768  # samples per counts task: ~18M non-zeros, ~0.5 GB of task memory
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
    """Pass 1 for one task (pure but for the files): its candidates' coded counts and document
    frequencies, written to rows/<shard>. Returns the number of candidates it holds."""
    fs, _ = filesystem(out_dir)
    folder = join(out_dir, "rows", task["shard"])
    if is_complete(fs, folder):
        return int(load_array(fs, folder, "cands").size)
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
    starts, codes = encode_counts(counts)
    save_arrays(
        fs,
        folder,
        {
            "starts": starts,
            "codes": codes,
            "cands": cands[keep].astype(np.int64),
            "df_cols": df_cols.astype(np.int32),
            "df_counts": df_counts.astype(np.int32),
        },
    )
    return int(keep.size)


def sum_df_range(r: int, out_dir: str, shards: list[str], ranges: int = DF_RANGES) -> np.ndarray:
    """Pass 2 for one column range: the document frequencies of columns [r, r + 1) x 2^24 / ranges,
    summed over every row shard (each shard's sorted columns sliced by binary search)."""
    fs, _ = filesystem(out_dir)
    width = HASH_FEATURES // ranges
    lo, hi = r * width, (r + 1) * width
    df = np.zeros(width, dtype=np.int64)
    for s in shards:
        folder = join(out_dir, "rows", s)
        cols, cnt = map_array(fs, folder, "df_cols"), map_array(fs, folder, "df_counts")
        a, b = np.searchsorted(cols, [lo, hi])
        df += np.bincount(cols[a:b] - lo, weights=cnt[a:b], minlength=width).astype(np.int64)
    return df


def weight_shard(shard: str, out_dir: str, idf: np.ndarray, cand_ifd: np.ndarray) -> int:
    """Pass 3 for one shard: each row's norm under the whole matrix's idf (float64) and its initial
    score, written to weights/<shard>. Returns the shard's non-zeros."""
    fs, _ = filesystem(out_dir)
    src, dst = join(out_dir, "rows", shard), join(out_dir, "weights", shard)
    if not is_complete(fs, dst):
        cands = load_array(fs, src, "cands")
        norms, initial, nnz = norms_and_scores(
            map_array(fs, src, "starts"),
            map_array(fs, src, "codes"),
            np.asarray(idf, np.float64),
            cand_ifd[cands],
        )
        save_arrays(fs, dst, {"norms": norms, "initial": initial, "nnz": np.array([nnz], dtype=np.int64)})
    for name in ("df_cols", "df_counts"):  # summed into idf.npy before any shard is weighted
        path = join(src, f"{name}.npy")
        if fs.exists(path):  # as large as the codes at 32,768 rows a shard: gone before the greedy
            fs.rm(path)
    return int(load_array(fs, dst, "nnz")[0])


def sharded_rows(out_dir: str, n: int) -> CodedRows:
    """The coded rows of OUT_DIR's n candidates, memory-mapped. What is read into memory: the norms and
    initial scores (16 bytes a candidate), the idf, and two index arrays (12 bytes a candidate); the
    rows (and their starts) are paged in as the greedy pops them."""
    fs, p = filesystem(out_dir)
    if not isinstance(fs, LocalFileSystem):  # object storage: a local copy to memory-map
        local = tempfile.mkdtemp(prefix="iterit-tfidf-")
        for part in ("rows", "weights"):
            fs.get(join(out_dir, part), os.path.join(local, part), recursive=True)
        fs.get(join(out_dir, "idf.npy"), os.path.join(local, "idf.npy"))
        p = local
    shards = []
    norms, initial = np.full(n, np.nan), np.full(n, np.nan)
    shard_of, local_of = np.full(n, -1, dtype=np.int32), np.zeros(n, dtype=np.int64)
    for s, name in enumerate(sorted(os.listdir(os.path.join(p, "rows")))):
        rows, weights = os.path.join(p, "rows", name), os.path.join(p, "weights", name)
        # Plain ndarray views of the maps: slicing a np.memmap builds a memmap object per row.
        shards.append(
            tuple(
                np.load(os.path.join(rows, f"{a}.npy"), mmap_mode="r").view(np.ndarray)
                for a in ("starts", "codes")
            )
        )
        cands = np.load(os.path.join(rows, "cands.npy"))
        shard_of[cands], local_of[cands] = s, np.arange(cands.size)
        norms[cands] = np.load(os.path.join(weights, "norms.npy"))
        initial[cands] = np.load(os.path.join(weights, "initial.npy"))
    if (shard_of < 0).any():
        raise ValueError(f"{out_dir}: {(shard_of < 0).sum():,} candidates have no row (an incomplete build)")
    idf = np.load(os.path.join(p, "idf.npy")).astype(np.float64)
    return CodedRows(shards, shard_of, local_of, norms, initial, idf)
