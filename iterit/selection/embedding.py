"""Diversity from response embeddings instead of TF-IDF: greedy on ifd_i * (1 - max(0, max_j cos(e_i, e_j)))
over the already selected j.

A pick can only raise a document's max similarity, so scores only go down and the lazy heap of
greedy.py applies (the same compiled array heap: ties to the lower candidate, an entry scored at the
current pick count is exact). Similarities are kept up to date in blocks: every `block` picks, one
matrix product (N x d) @ (d x block) folds the block's picks into every document's max similarity,
with torch on the driver's GPU when it has one (else torch on its CPUs, the same code); inside a block,
a popped document catches up on at most `block` picks (compiled, on the CPU). No N x N or N x k
matrix: O(N x d x k) FLOPs in all, nearly all of them in the blocked products.

Embeddings come as scoring stores them: unit rows, float32 or float16 (scoring.embedding_dtype). They
are never copied to float32 whole: the products convert one row block at a time, the catch-ups read
float16 through a 65,536-entry table (numba has no float16), so the driver holds 2 bytes a value.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from iterit.selection.greedy import heapify, pop_top, sift_down


@functools.cache
def _half_to_float() -> np.ndarray:
    """float32 of every float16 bit pattern: exact (float16 values are all float32 values)."""
    return np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def _value(rows, lut, c, j):
    """Document c's j-th embedding value as float32 (`lut` None: the rows are float32)."""
    if lut is None:
        return rows[c, j]
    return lut[rows[c, j]]


@njit(cache=True, nogil=True, fastmath=True)
def _max_dot(picked, start, stop, row, m):
    """max(m, max over picks p in [start, stop) of picked[p] . row), float32; fastmath lets the dot
    products vectorise (their summation order is the compiler's, as a BLAS call's would be)."""
    for p in range(start, stop):
        s = np.float32(0.0)
        for j in range(row.shape[0]):
            s += picked[p, j] * row[j]
        m = max(m, s)
    return m


@njit(cache=True, nogil=True)
def _embedding_steps(state, score, idx, epoch, max_sim, seen, rows, lut, picked, ifd, picks, gains, until):
    """The lazy greedy from state = [heap size, picks made, picks folded into every document] until
    `until` picks (the next blocked product) or no candidate is left. A stale top catches up on the
    picks since max(seen[c], folded), is re-scored and sifted down; an exact top is taken."""
    size, now, folded = state[0], state[1], state[2]
    d = picked.shape[1]
    row = np.empty(d, dtype=np.float32)  # the popped document's embedding, widened once
    while size > 0 and now < until:
        c = idx[0]
        if epoch[0] == now:
            picks[now], gains[now] = c, score[0]
            for j in range(d):
                picked[now, j] = _value(rows, lut, c, j)
            now += 1
            size = pop_top(score, idx, epoch, size)
            continue
        m = max_sim[c]
        start = max(seen[c], folded)
        if start < now:
            for j in range(d):
                row[j] = _value(rows, lut, c, j)
            m = _max_dot(picked, start, now, row, m)
        max_sim[c], seen[c] = m, now
        score[0] = ifd[c] * (1.0 - np.float64(m))
        epoch[0] = now
        sift_down(score, idx, epoch, size, 0)
    state[0], state[1] = size, now


def products_device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _fold(emb, on_device, new: np.ndarray, max_sim: np.ndarray, rows_per_product: int, dev) -> None:
    """max_sim = max(max_sim, max over the new picks of emb @ new.T), one row block at a time (the
    (rows, block) temporary stays bounded), in float32 whatever the stored dtype."""
    import torch

    w = torch.from_numpy(np.ascontiguousarray(new.T)).to(dev)  # (d, block)
    for r in range(0, emb.shape[0], rows_per_product):
        if on_device is not None:
            part = on_device[r : r + rows_per_product].to(torch.float32)
        else:  # a float32 copy of the block: memory-mapped or float16 rows convert here
            part = torch.from_numpy(np.array(emb[r : r + rows_per_product], dtype=np.float32))
        sims = (part @ w).amax(dim=1).cpu().numpy()
        np.maximum(max_sim[r : r + rows_per_product], sims, out=max_sim[r : r + rows_per_product])


def lazy_embedding_greedy(
    ifd: np.ndarray,
    emb: np.ndarray,
    k: int,
    block: int = 512,
    rows_per_product: int = 65_536,
    device: str | None = None,
    on_picks=None,
) -> tuple[list[int], list[float]]:
    """(picks in order, gain of each pick). `emb` rows are L2-normalised (as scoring stores them),
    float32 or float16, in memory or memory-mapped. `device`: where the blocked products run (None:
    "cuda" when torch sees a GPU, else "cpu"); on a GPU the embeddings are copied there once, in their
    stored dtype. on_picks(n): the picks made since the last call, once a block."""
    ifd = np.asarray(ifd, dtype=np.float64)
    emb = np.asarray(emb)
    if emb.dtype == np.float16:
        rows, lut = emb.view(np.uint16), _half_to_float()
    else:
        emb = emb.astype(np.float32, copy=False)
        rows, lut = emb, None
    n = len(ifd)
    k = min(k, n)
    dev = products_device(device)
    on_device = None
    if dev.type != "cpu":
        import torch

        on_device = torch.from_numpy(np.ascontiguousarray(emb)).to(dev)
    max_sim = np.zeros(n, dtype=np.float32)  # max(0, cosine) to the picks folded in so far
    seen = np.zeros(n, dtype=np.int64)  # picks max_sim[i] accounts for, when more than the folded ones
    picked = np.empty((k, emb.shape[1]), dtype=np.float32)
    score, idx, epoch = ifd.copy(), np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    heapify(score, idx, epoch, n)  # with nothing picked, the score is the IFD
    picks, gains = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float64)
    state = np.array([n, 0, 0], dtype=np.int64)
    while state[1] < k and state[0] > 0:
        before, folded = int(state[1]), int(state[2])
        if before - folded >= block:  # fold the last block of picks into every document at once
            _fold(emb, on_device, picked[folded:before], max_sim, rows_per_product, dev)
            state[2] = before
        until = min(k, int(state[2]) + block)
        _embedding_steps(state, score, idx, epoch, max_sim, seen, rows, lut, picked, ifd, picks, gains, until)
        if on_picks is not None:
            on_picks(int(state[1]) - before)
    done = int(state[1])
    return picks[:done].tolist(), gains[:done].tolist()
