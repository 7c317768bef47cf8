"""Complexity x diversity greedy selection (DESIGN section 2), exact and fast. numpy/scipy only.

The official loop, k times: score every candidate as ifd_i * sum_t w_it (the remaining TF-IDF mass
of its response), take the argmax (ties to the lowest position), multiply every column t used by the
pick by `decay` for all documents, drop the pick. That is O(k x nnz): minutes at 50K samples.

Here the decayed weight is w_it * f_t with one factor f_t per term, and scores only ever go down
(f_t shrinks, picks leave), so a max-heap of stale scores is a heap of upper bounds: pop the top,
recompute that one document's score from its own row, and take it if it did not change, else push it
back. The picks are the official loop's, in the same order; the cost is O(nnz) to start plus
O(row) per re-evaluation.
"""

from __future__ import annotations

import heapq

import numpy as np
import scipy.sparse as sp


def reference_greedy(
    ifd: np.ndarray, tfidf: sp.spmatrix, k: int, decay: float
) -> tuple[list[int], list[float]]:
    """A plain port of the official loop (src/data_utils.py), kept as the yardstick for tests and
    benchmarks. One deliberate difference: a picked row never comes back (the official loop zeroes it,
    and np.argmax could return it again once every remaining score is 0)."""
    m = sp.csc_matrix(tfidf, dtype=np.float64, copy=True)
    m.sort_indices()
    picked = np.zeros(m.shape[0], dtype=bool)
    picks, gains = [], []
    for _ in range(min(k, m.shape[0])):
        scores = ifd * np.asarray(m.sum(axis=1)).ravel()
        scores[picked] = -np.inf
        best = int(np.argmax(scores))
        picks.append(best)
        gains.append(float(scores[best]))
        picked[best] = True
        row = m.getrow(best)
        for col in row.indices[row.data != 0]:  # scipy.sparse.find: the row's non-zero entries
            a, b = m.indptr[col], m.indptr[col + 1]
            m.data[a:b] *= decay  # the official loop: decay column t for every document
            m.data[a + np.searchsorted(m.indices[a:b], best)] = 0.0  # and zero the pick's entry
    return picks, gains


def row_score(ifd_i: float, data: np.ndarray, indices: np.ndarray, factor: np.ndarray | None) -> float:
    """ifd_i x the remaining TF-IDF mass of one row: sum_t w_it f_t (factor None: every f_t = 1).
    The one routine for initial scores and re-evaluations, wherever the rows live: the lazy greedy's
    exactness needs a score recomputed unchanged to compare equal to the one pushed."""
    f = factor[indices] if factor is not None else np.ones(len(indices))
    return float(ifd_i * np.dot(data, f))  # float32 rows (hashed) accumulate against float64 factors


def initial_scores(ifd: np.ndarray, x: sp.csr_matrix) -> np.ndarray:
    """row_score of every row of `x` before any pick (every factor 1)."""
    ifd = np.asarray(ifd, dtype=np.float64)
    ip, ix, d = x.indptr, x.indices, x.data
    return np.array(
        [row_score(ifd[i], d[ip[i] : ip[i + 1]], ix[ip[i] : ip[i + 1]], None) for i in range(x.shape[0])]
    )


def lazy_greedy_rows(
    ifd: np.ndarray, row, initial: np.ndarray, n_terms: int, k: int, decay: float, on_pick=None
) -> tuple[list[int], list[float]]:
    """The lazy greedy over rows read one at a time: row(i) -> (indices, data) of document i;
    `initial[i]` = row_score(ifd[i], *row i, None), however it was computed (in parallel, per shard).
    Only the popped rows are read: the matrix itself can stay on disk. on_pick(): called after each pick
    (a progress bar's update)."""
    ifd = np.asarray(ifd, dtype=np.float64)
    factor = np.ones(n_terms, dtype=np.float64)  # f_t = decay ** (times term t was picked)
    heap = list(zip((-np.asarray(initial, dtype=np.float64)).tolist(), range(len(ifd))))
    heapq.heapify(heap)
    picks, gains = [], []
    while heap and len(picks) < k:
        neg, i = heapq.heappop(heap)
        indices, data = row(i)
        s = row_score(ifd[i], data, indices, factor)
        if s == -neg:  # unchanged since pushed: no other candidate can beat it (ties: lower i first)
            picks.append(i)
            gains.append(s)
            factor[indices] *= decay
            if on_pick is not None:
                on_pick()
        else:
            heapq.heappush(heap, (-s, i))
    return picks, gains


def lazy_greedy(
    ifd: np.ndarray, tfidf: sp.spmatrix, k: int, decay: float, on_pick=None
) -> tuple[list[int], list[float]]:
    """The same picks as reference_greedy, lazily: (picks in order, gain of each pick)."""
    x = sp.csr_matrix(tfidf)
    indptr, indices, data = x.indptr, x.indices, x.data

    def row(i: int):
        a, b = indptr[i], indptr[i + 1]
        return indices[a:b], data[a:b]

    return lazy_greedy_rows(ifd, row, initial_scores(ifd, x), x.shape[1], k, decay, on_pick)


def rest_by_ifd(ifd: np.ndarray, picked: list[int]) -> list[int]:
    """The candidates not picked, in descending IFD (ties to the lower position)."""
    mask = np.ones(len(ifd), dtype=bool)
    mask[picked] = False
    rest = np.flatnonzero(mask)
    return rest[np.argsort(-ifd[rest], kind="stable")].tolist()
