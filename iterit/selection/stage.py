"""The selection stage on files: samples + scores -> selection.jsonl + order.parquet (DESIGN section 3)."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iterit.errors import IteritError
from iterit.io import atomic_open, filesystem, join, read_parquet
from iterit.selection.window import WindowOrder, select_window

ORDER_SCHEMA = pa.schema(
    [("id", pa.string()), ("position", pa.int64()), ("ifd", pa.float64()), ("status", pa.string())]
)


def read_score_rows(path: str) -> dict[str, dict]:
    """id -> {ifd, n_response_tokens?, embedding?} from a scores Parquet or JSONL rows {id, ifd}."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise IteritError(
            f"scores not found: {path} (give the scores.parquet of `iterit score`, or JSONL {{id, ifd}})"
        )
    out: dict[str, dict] = {}
    if p.endswith(".parquet"):
        lines = enumerate(read_parquet(path).to_pylist(), start=1)
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
) -> dict:
    """Order every sample of `samples_path` (its file order is the window) and write the picks.

    `k_of(n)` gives the budget for n samples (SelectionConfig.num_selected). Samples without a score
    are treated as rejected: they are never picked and sit with the others after the picks."""
    from iterit.data import read_samples

    t0 = time.perf_counter()
    table = read_samples(samples_path)
    ids = table.column("id").to_pylist()
    scores = read_score_rows(scores_path)
    unknown = len(set(scores) - set(ids))
    ifd = np.array([scores[i]["ifd"] if i in scores else np.nan for i in ids], dtype=np.float64)
    k = k_of(len(ids))
    responses = (
        [m[-1]["content"] for m in table.column("messages").to_pylist()] if method == "iterit" else None
    )
    tokens = emb = None
    if method == "longest":
        if not all("n_response_tokens" in scores.get(i, {"n_response_tokens": 0}) for i in ids):
            raise IteritError(
                "method longest needs n_response_tokens in --scores (the scores.parquet of `iterit score`)"
            )
        tokens = np.array([scores[i]["n_response_tokens"] if i in scores else 0 for i in ids])
    if method == "embedding":
        if not all(scores[i].get("embedding") is not None for i in ids if i in scores):
            raise IteritError(
                "method embedding needs the embedding column (score with scoring.embeddings: true)"
            )
        dim = len(next(iter(scores.values()))["embedding"])
        emb = np.array(
            [scores[i]["embedding"] if i in scores else np.zeros(dim) for i in ids], dtype=np.float32
        )
    wo = select_window(
        ifd,
        k,
        method,
        responses=responses,
        eos_token=eos_token,
        decay=decay,
        n_response_tokens=tokens,
        embeddings=emb,
        seed=seed,
        tfidf_mode=tfidf_mode,
    )
    write_selection(output_dir, ids, ifd, wo)
    summary = {
        "samples": len(ids),
        "scored": int(np.isfinite(ifd).sum()),
        "unknown_score_ids": unknown,
        "candidates": wo.status.count("selected") + wo.status.count("candidate"),
        "k": len(wo.picks),
        "method": method,
        "seconds": round(time.perf_counter() - t0, 2),
        "selection": join(output_dir, "selection.jsonl"),
        "order": join(output_dir, "order.parquet"),
    }
    return summary


def write_selection(output_dir: str, ids: list[str], ifd: np.ndarray, wo: WindowOrder) -> None:
    with atomic_open(join(output_dir, "selection.jsonl"), "w") as f:
        for rank, (pos, gain) in enumerate(zip(wo.picks, wo.gains)):
            f.write(json.dumps({"id": ids[pos], "rank": rank, "ifd": float(ifd[pos]), "gain": gain}) + "\n")
    order = pa.table(
        {
            "id": [ids[p] for p in wo.order],
            "position": np.arange(len(wo.order), dtype=np.int64),
            "ifd": ifd[wo.order],
            "status": wo.status,
        },
        schema=ORDER_SCHEMA,
    )
    with atomic_open(join(output_dir, "order.parquet")) as f:
        pq.write_table(order, f)
