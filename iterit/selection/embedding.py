"""Diversity from response embeddings instead of TF-IDF: greedy on ifd_i * (1 - max(0, max_j cos(e_i, e_j)))
over the already selected j.

A pick can only raise a document's max similarity, so scores only go down and the lazy heap of
greedy.py applies. Similarities are kept up to date in blocks: every `block` picks, one matrix product
(N x d) @ (d x block) folds the block's picks into every document's max similarity; inside a block,
a popped document catches up on at most `block` picks. No N x N or N x k matrix, and the bulk of the
work is BLAS-sized matrix products: O(N x d x k) FLOPs in all.
"""

from __future__ import annotations

import heapq

import numpy as np


def lazy_embedding_greedy(
    ifd: np.ndarray, emb: np.ndarray, k: int, block: int = 512, rows_per_product: int = 65_536
) -> tuple[list[int], list[float]]:
    """(picks in order, gain of each pick). `emb` rows are L2-normalised (as scoring stores them)."""
    ifd = np.asarray(ifd, dtype=np.float64)
    emb = np.asarray(emb, dtype=np.float32)
    n = len(ifd)
    max_sim = np.zeros(n, dtype=np.float32)  # max(0, cosine) to the picks folded in so far
    seen = np.zeros(n, dtype=np.int64)  # how many picks max_sim[i] accounts for
    picked_vecs = np.empty((min(k, n), emb.shape[1]), dtype=np.float32)
    picks: list[int] = []
    gains: list[float] = []
    folded = 0  # picks folded into every document by the blocked products
    heap = [(-float(ifd[i]), i) for i in range(n)]  # with nothing picked, the score is the IFD
    heapq.heapify(heap)
    while heap and len(picks) < k:
        if len(picks) - folded >= block:  # fold the last block of picks into every document at once
            new = picked_vecs[folded : len(picks)].T  # (d, block)
            for r in range(0, n, rows_per_product):  # row blocks bound the (rows, block) temporary
                part = max_sim[r : r + rows_per_product]
                np.maximum(part, (emb[r : r + rows_per_product] @ new).max(axis=1), out=part)
            seen[:] = len(picks)
            folded = len(picks)
        neg, i = heapq.heappop(heap)
        if seen[i] < len(picks):  # catch up on this block's picks only
            max_sim[i] = max(max_sim[i], (picked_vecs[seen[i] : len(picks)] @ emb[i]).max())
            seen[i] = len(picks)
        s = float(ifd[i] * (1.0 - float(max_sim[i])))
        if s == -neg:
            picked_vecs[len(picks)] = emb[i]
            picks.append(i)
            gains.append(s)
        else:
            heapq.heappush(heap, (-s, i))
    return picks, gains
