"""The selection stage on files: samples + scores -> selection.jsonl + order.parquet
(docs/architecture.md section 3).

read_score_rows   JSONL rows {id, ifd} (or a scores table) -> id -> row, checked row by row
score_table       the scored rows of a scores folder or Parquet (or that JSONL) as one Arrow table
window_inputs     the per-sample arrays a method reads, for the ids of a window, aligned in Arrow
diversity_inputs  what iterit's diversity term reads: the window's responses (TF-IDF in memory), or
                  the candidates' hashed TF-IDF rows built on the cluster (selection.shards)
run_selection     `iterit select`: one window = the whole corpus in file order
"""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iterit import cluster
from iterit.errors import IteritError
from iterit.io import filesystem
from iterit.rundir import SelectionFiles, id_array, read_scores
from iterit.selection.window import select_window


def score_columns(method: str) -> list[str]:
    """The score columns read_score_rows takes for a method: id and IFD, and the response length for
    longest (the embedding method's vectors come through read_embeddings)."""
    extra = {"longest": ["n_response_tokens"]}.get(method, [])  # embeddings: read_embeddings, in Arrow
    return ["id", "ifd", *extra]


def _is_scores_table(fs, p: str) -> bool:
    """A scores folder or scores.parquet of `iterit score` (else: JSONL rows {id, ifd})."""
    return fs.isdir(p) or p.endswith(".parquet")


def read_score_rows(path: str, columns: list[str] | None = None) -> dict[str, dict]:
    """id -> {ifd, ...} of the scored rows: a scores folder (or scores.parquet) of `iterit score`, only
    `columns` (default: id and ifd), or JSONL rows {id, ifd}."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise IteritError(
            f"scores not found: {path} (give the scores folder of `iterit score`, or JSONL {{id, ifd}})"
        )
    out: dict[str, dict] = {}
    if _is_scores_table(fs, p):
        lines = enumerate(read_scores(path, columns or ["id", "ifd"]).to_pylist(), start=1)
    else:
        with fs.open(p, "r", encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    for n, row in lines:
        if isinstance(row, str):
            try:
                row = json.loads(row)
            except json.JSONDecodeError as e:
                raise IteritError(
                    f'{path} line {n}: not JSON ({e.msg}); expected {{"id": ..., "ifd": ...}}'
                ) from None
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("ifd"), (int, float)):
            raise IteritError(f"{path} row {n}: needs an 'id' and a numeric 'ifd', got {str(row)[:80]}")
        out[str(row["id"])] = row
    return out


def score_table(path: str, columns: list[str]) -> pa.Table:
    """The scored rows of `path`, `columns` only: a scores folder (or scores.parquet) of `iterit score`
    read in Arrow (at 10^7 rows, Python dicts of them would be gigabytes on the driver), or JSONL rows
    {id, ifd} checked by read_score_rows."""
    fs, p = filesystem(path)
    if fs.exists(p) and _is_scores_table(fs, p):
        table = read_scores(path, columns)
        return table.set_column(0, "id", pc.cast(table.column("id"), pa.string()))
    rows = read_score_rows(path, columns).values()
    return pa.table({c: [r.get(c) for r in rows] for c in columns}).set_column(
        0, "id", pa.array([str(r["id"]) for r in rows], pa.string())
    )


def _align(ids, scores: pa.Table) -> pa.Array:
    """For each of `ids` (an Arrow array or a list), the row of `scores` holding its score; null where
    it has none."""
    return pc.index_in(id_array(ids), value_set=scores.column("id").combine_chunks())


def window_inputs(ids, scores: pa.Table, method: str, scores_path: str) -> dict:
    """select_window's per-sample arrays for `ids` (Arrow strings, or a list): ifd (NaN where a sample
    has no score: rejected while scoring, or never scored), and n_response_tokens (longest) or
    embeddings (embedding, read from `scores_path`). `scores`: score_table's."""
    rows = _align(ids, scores)
    ifd = pc.cast(scores.column("ifd"), pa.float64()).take(rows).fill_null(np.nan)
    out = {"ifd": np.asarray(ifd.to_numpy(zero_copy_only=False), dtype=np.float64)}
    if method == "longest":
        if "n_response_tokens" not in scores.column_names or scores.column("n_response_tokens").null_count:
            raise IteritError(
                "method longest needs n_response_tokens in the scores (the scores.parquet of `iterit score`)"
            )
        tokens = scores.column("n_response_tokens").take(rows).fill_null(0)
        out["n_response_tokens"] = tokens.to_numpy(zero_copy_only=False)
    if method == "embedding":
        out["embeddings"] = read_embeddings(scores_path, ids)
    return out


def unknown_ids(scores: pa.Table, ids) -> int:
    """How many scored ids are not among `ids`."""
    return int(pc.sum(pc.invert(pc.is_in(scores.column("id"), value_set=id_array(ids)))).as_py() or 0)


def read_embeddings(scores_path: str, ids: list[str]) -> np.ndarray:
    """(len(ids), d) embeddings of `ids` in their stored dtype (float16 stays float16: 2 bytes a value on
    the driver), zeros for a sample without a score. Taken from Arrow part by part, never as Python
    lists (at 10^6 samples of 256 values those would be ~10 GB)."""
    from iterit.rundir import iter_scores

    fs, p = filesystem(scores_path)
    if not _is_scores_table(fs, p):
        raise IteritError(
            f"{scores_path}: method embedding reads the embedding column of a scores folder or "
            "scores.parquet of `iterit score`, not JSONL"
        )
    value_set, out = id_array(ids), None
    for part in iter_scores(scores_path, ["id", "embedding"]):
        if "embedding" not in part.column_names:
            raise IteritError(
                f"{scores_path}: method embedding needs the embedding column (score with "
                "scoring.embeddings: true)"
            )
        col = part.column("embedding").combine_chunks()
        if col.null_count:
            raise IteritError(
                f"{scores_path}: {col.null_count:,} scored rows have no embedding; rescore with "
                "scoring.embeddings: true"
            )
        dim = (
            col.type.list_size
            if pa.types.is_fixed_size_list(col.type)
            else pc.list_value_length(col)[0].as_py()
        )
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) if len(col) else None
        if out is None:
            out = np.zeros((len(ids), dim), dtype=values.dtype if values is not None else np.float32)
        pos = pc.index_in(part.column("id").cast(pa.string()), value_set=value_set)  # null: not in ids
        mine = np.flatnonzero(pos.is_valid().to_numpy(zero_copy_only=False))
        if mine.size:
            out[pos.drop_null().to_numpy()] = values[mine]
    if out is None:
        raise IteritError(f"scores not found: {scores_path}")
    return out


def _with_samples(samples_path: str, read):
    """read(the samples file as a pq.ParquetFile), the file closed after."""
    fs, p = filesystem(samples_path)
    with fs.open(p, "rb") as f:
        return read(pq.ParquetFile(f))


def sample_ids(samples_path: str) -> pa.Array:
    """The ids of the samples file in file order (the corpus order), one Arrow string array: at 10^7
    samples Python strings would take ~10x the memory."""
    ids = _with_samples(samples_path, lambda f: f.read(columns=["id"]).column("id"))
    return pc.cast(ids, pa.string()).combine_chunks()


def sample_count(samples_path: str) -> int:
    return _with_samples(samples_path, lambda f: f.metadata.num_rows)


def read_responses(samples_path: str, rows: np.ndarray) -> list[str]:
    """The final responses of those rows of the samples file, in that order."""
    from iterit.selection.shards import final_contents

    messages = _with_samples(samples_path, lambda f: f.read(columns=["messages"]).column("messages"))
    return final_contents(messages.take(np.asarray(rows, dtype=np.int64)))


def uses_cluster_tfidf(method: str, tfidf_mode: str, n_candidates: int) -> bool:
    """The hashed mode (asked for, or auto above EXACT_MAX_DOCS candidates) is built on the cluster."""
    from iterit.selection.tfidf import EXACT_MAX_DOCS

    hashed = tfidf_mode == "hashed" or (tfidf_mode == "auto" and n_candidates > EXACT_MAX_DOCS)
    return method == "iterit" and hashed


def diversity_inputs(
    samples_path: str,
    window_rows: np.ndarray,
    ifd: np.ndarray,
    method: str,
    tfidf_mode: str,
    work_dir: str,
    eos_token: str | None,
    log=print,
) -> dict:
    """select_window's diversity inputs for a window (`window_rows`: the samples-file row of each window
    entry, `ifd` aligned with them): nothing for the methods without TF-IDF; {"responses"} aligned with
    the window for TF-IDF in memory (exact mode); {"tfidf_rows"} for the hashed mode, the candidates'
    rows built by the cluster in WORK_DIR (selection.shards): the driver never reads the texts."""
    if method != "iterit":
        return {}
    cand = np.flatnonzero(np.isfinite(ifd) & (ifd < 1))
    if not uses_cluster_tfidf(method, tfidf_mode, cand.size):
        return {"responses": read_responses(samples_path, window_rows)}
    from iterit.selection.pipeline import build_shards
    from iterit.selection.shards import sharded_rows

    cluster.connect()
    # Ray's tasks run in other directories: the paths they are given are absolute.
    samples_path, work_dir = cluster.absolute(samples_path), cluster.absolute(work_dir)
    cand_of_row = np.full(sample_count(samples_path), -1, dtype=np.int64)
    cand_of_row[np.asarray(window_rows)[cand]] = np.arange(cand.size)
    built = build_shards(samples_path, cand_of_row, ifd[cand], work_dir, eos_token, log=log)
    log(
        f"  TF-IDF rows: {built['nnz']:,} non-zeros in {built['shards']} shards, "
        f"{built['bytes'] / 2**30:.2f} GiB on disk"
    )
    return {"tfidf_rows": sharded_rows(work_dir, cand.size)}


PROGRESS_MIN_PICKS = 10_000  # below this a selection takes seconds: no bar


@contextlib.contextmanager
def pick_progress(k: int, method: str):
    """select_window's on_picks for long selections: a progress bar of the greedy of iterit or embedding
    (picks done, picks/s, ETA); None for short ones and the methods that sort. It redraws at most every
    10 s, so a job log (not a terminal) gets a line every 10 s, not one per pick."""
    if k < PROGRESS_MIN_PICKS or method not in ("iterit", "embedding"):
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=k, desc=f"  {method} greedy", unit="pick", mininterval=10, dynamic_ncols=True) as bar:
        yield bar.update


def remove_tfidf(work_dir: str) -> None:
    fs, p = filesystem(work_dir)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def run_selection(
    samples_path: str,
    scores_path: str,
    k_of,
    method: str,
    output_dir: str,
    *,
    decay: float = 0.1,
    eos_token: str | None = None,
    seed: int = 42,
    tfidf_mode: str = "auto",
    log=print,
) -> dict:
    """Order every sample of `samples_path` (its file order is the window) and write the picks.

    `k_of(n)` gives the budget for n samples (SelectionConfig.num_selected). Samples without a score
    are treated as rejected: they are never picked and sit with the others after the picks. The random
    method draws as iteration 0 of a run seeded `seed` would."""
    t0 = time.perf_counter()
    ids = sample_ids(samples_path)
    scores = score_table(scores_path, score_columns(method))
    unknown = unknown_ids(scores, ids)
    arrays = window_inputs(ids, scores, method, scores_path)
    del scores
    ifd = arrays["ifd"]
    files = SelectionFiles(output_dir)
    diversity = diversity_inputs(
        samples_path, np.arange(len(ids)), ifd, method, tfidf_mode, files.tfidf, eos_token, log
    )
    k = k_of(len(ids))
    with pick_progress(k, method) as on_picks:
        wo = select_window(
            ifd,
            k,
            method,
            eos_token=eos_token,
            decay=decay,
            n_response_tokens=arrays.get("n_response_tokens"),
            embeddings=arrays.get("embeddings"),
            seed=seed,
            iteration=0,
            tfidf_mode=tfidf_mode,
            on_picks=on_picks,
            **diversity,
        )
    files.write(ids.take(pa.array(wo.order, pa.int64())), ifd[wo.order], wo.status, wo.gains)
    remove_tfidf(files.tfidf)
    return {
        "samples": len(ids),
        "scored": int(np.isfinite(ifd).sum()),
        "unknown_score_ids": unknown,
        "candidates": wo.status.count("selected") + wo.status.count("candidate"),
        "k": len(wo.picks),
        "method": method,
        "seconds": round(time.perf_counter() - t0, 2),
        "selection": files.selection,
        "order": files.order,
    }
