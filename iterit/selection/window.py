"""Ordering a window of samples by a selection method (docs/architecture.md section 2, Selection
and Iteration).

    new order = [k picks, in pick order] + [the others: ifd >= 1, not finite, or rejected]
                + [the remaining candidates, in descending IFD]

Candidates are the samples with a finite IFD below 1 for the IFD-based methods (iterit, ifd,
embedding), and every scored sample for the baselines (random, longest, full). Iterations after the
first re-order only the first W samples of the current order and leave the tail as it was
(`reorder`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from iterit.config import iteration_rng
from iterit.rundir import id_array
from iterit.selection.greedy import lazy_greedy, lazy_greedy_coded, rest_by_ifd

METHODS = ("iterit", "ifd", "random", "longest", "embedding", "full")


@dataclass
class WindowOrder:
    order: list[int]  # window positions, new order
    status: list[str]  # per entry of `order`: selected | other | candidate
    picks: list[int]  # window positions selected, in pick order (== order[:len(picks)])
    gains: list[float]  # per pick: ifd x remaining diversity at pick time (iterit, embedding), else ifd


def select_window(
    ifd: np.ndarray,
    k: int,
    method: str = "iterit",
    *,
    responses: list[str] | None = None,
    eos_token: str | None = None,
    decay: float = 0.1,
    n_response_tokens: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    seed: int = 42,
    iteration: int = 0,
    tfidf_mode: str = "auto",
    tfidf_rows=None,
    on_picks=None,
) -> WindowOrder:
    """Order one window. `ifd` has NaN for samples that were rejected or not scored. The random method
    draws from iteration_rng(seed, iteration), the run's one stream for that iteration. iterit reads
    either `responses` (TF-IDF built here, in memory) or `tfidf_rows`, the candidates' rows built on the
    cluster (selection.shards.sharded_rows, candidates numbered in window order). on_picks(n): from
    iterit's greedy, with the picks made since its last call (a progress bar)."""
    ifd = np.asarray(ifd, dtype=np.float64)
    finite = np.isfinite(ifd)
    ifd_based = method in ("iterit", "ifd", "embedding")
    cand = np.flatnonzero(finite & (ifd < 1)) if ifd_based else np.flatnonzero(finite)
    others = np.flatnonzero(~np.isin(np.arange(len(ifd)), cand)).tolist()
    c_ifd = ifd[cand]
    k = min(k, len(cand)) if method != "full" else len(cand)
    gains: list[float] | None = None
    if method == "iterit" and tfidf_rows is not None:
        if len(tfidf_rows.initial) != len(cand):
            raise ValueError(
                f"tfidf_rows holds {len(tfidf_rows.initial):,} rows for {len(cand):,} candidates"
            )
        picked, gains = lazy_greedy_coded(c_ifd, tfidf_rows, k, decay, on_picks)
        rest = rest_by_ifd(c_ifd, picked)
    elif method == "iterit":
        from iterit.selection.tfidf import exact_tfidf, hashed_rows, resolved_mode, response_texts

        if responses is None:
            raise ValueError("method iterit needs the response texts")
        texts = response_texts([responses[i] for i in cand], eos_token)
        if resolved_mode(tfidf_mode, len(texts)) == "hashed":  # the cluster's rows, built here
            picked, gains = lazy_greedy_coded(c_ifd, hashed_rows(texts, c_ifd), k, decay, on_picks)
        else:
            picked, gains = lazy_greedy(c_ifd, exact_tfidf(texts), k, decay, on_picks)
        rest = rest_by_ifd(c_ifd, picked)
    elif method == "embedding":
        from iterit.selection.embedding import lazy_embedding_greedy

        if embeddings is None:
            raise ValueError("method embedding needs response embeddings (scoring.embeddings: true)")
        picked, gains = lazy_embedding_greedy(c_ifd, np.asarray(embeddings)[cand], k, on_picks=on_picks)
        rest = rest_by_ifd(c_ifd, picked)
    elif method in ("ifd", "full"):
        ranked = rest_by_ifd(c_ifd, []) if method == "ifd" else list(range(len(cand)))
        picked, rest = ranked[:k], ranked[k:]
    elif method == "random":
        ranked = iteration_rng(seed, iteration).permutation(len(cand)).tolist()
        picked, rest = ranked[:k], ranked[k:]
    elif method == "longest":
        if n_response_tokens is None:
            raise ValueError("method longest needs n_response_tokens")
        ranked = np.argsort(-np.asarray(n_response_tokens)[cand], kind="stable").tolist()
        picked, rest = ranked[:k], ranked[k:]
    else:
        raise ValueError(f"unknown selection method {method!r}: expected one of {', '.join(METHODS)}")
    picks = cand[picked].tolist()
    if gains is None:
        gains = [float(ifd[p]) for p in picks]
    order = picks + others + cand[rest].tolist()
    status = ["selected"] * len(picks) + ["other"] * len(others) + ["candidate"] * len(rest)
    return WindowOrder(order, status, picks, list(map(float, gains)))


def reorder(current, window_ifd: np.ndarray, k: int, method: str = "iterit", **kwargs):
    """Later iterations: re-order the first W = len(window_ifd) ids of `current` (an Arrow string array,
    or a list) by their new scores (`window_ifd`, aligned with them) and keep the tail as it was.
    Returns (the new full order of ids, as an Arrow array; the window's WindowOrder). `kwargs` go to
    select_window (`responses` and `tfidf_rows` aligned with the window)."""
    current = id_array(current)
    w = len(window_ifd)
    if w > len(current):
        raise ValueError(f"{w:,} window scores for an order of {len(current):,} ids")
    wo = select_window(np.asarray(window_ifd, dtype=np.float64), k, method, **kwargs)
    moved = current.slice(0, w).take(pa.array(wo.order, pa.int64()))
    return pa.concat_arrays([moved, current.slice(w)]), wo
