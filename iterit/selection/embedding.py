"""Diversity from response embeddings instead of TF-IDF: greedy on ifd_i * (1 - max(0, max_j cos(e_i, e_j)))
over the already selected j. The same lazy scheme as greedy.py applies (a pick can only raise a
document's max similarity, so scores only go down), and a document's max similarity is brought up to
date only when it is popped, against the picks made since: no N x N matrix, no N x k matrix.
"""

from __future__ import annotations

import heapq

import numpy as np


def lazy_embedding_greedy(ifd: np.ndarray, emb: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """(picks in order, gain of each pick). `emb` rows are L2-normalised (as scoring stores them)."""
    ifd = np.asarray(ifd, dtype=np.float64)
    emb = np.asarray(emb, dtype=np.float32)
    n = len(ifd)
    max_sim = np.zeros(n, dtype=np.float64)  # max(0, cosine) to the picks seen so far
    seen = np.zeros(n, dtype=np.int64)  # how many picks max_sim[i] accounts for
    picked_vecs = np.empty((min(k, n), emb.shape[1]), dtype=np.float32)
    picks: list[int] = []
    gains: list[float] = []
    heap = [(-float(ifd[i]), i) for i in range(n)]  # with nothing picked, the score is the IFD
    heapq.heapify(heap)
    while heap and len(picks) < k:
        neg, i = heapq.heappop(heap)
        if seen[i] < len(picks):
            sims = picked_vecs[seen[i]:len(picks)] @ emb[i]
            max_sim[i] = max(max_sim[i], float(sims.max()))
            seen[i] = len(picks)
        s = float(ifd[i] * (1.0 - max_sim[i]))
        if s == -neg:
            picked_vecs[len(picks)] = emb[i]
            picks.append(i)
            gains.append(s)
        else:
            heapq.heappush(heap, (-s, i))
    return picks, gains
