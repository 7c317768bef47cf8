"""Hashed TF-IDF rows as coded counts: 3 bytes a non-zero, where float weights take 8. numpy/numba only.

At 10^7 responses the hashed 1-3-gram matrix has ~5.6 x 10^9 non-zeros: 42 GiB as (int32 column,
float32 weight), more than a driver's page cache, so a greedy over memory-mapped rows reads from disk
(measured: 40+ minutes). A row's weights are its counts x idf / its l2 norm, and the idf is one array
of 2^24, so a row needs only its columns and counts; columns are sorted within a row, so a column is
the gap from the one before. One entry is a 24-bit word, little-endian:

    bits 0-6   the count (1-127)
    bits 7-23  the gap to the previous column of the row (0-131,071; the first: the column itself)
    count 0    an escape: the next two words hold the column and the count whole (24 bits each), for
               a gap or count that does not fit (~1% of entries at 560 non-zeros a row in 2^24 columns)

What the greedy computes from a row (one definition, the same bits wherever it runs: in memory, in a
cluster task, on the driver over memory-mapped shards):
    norm_r     sqrt(sum_t (count_rt x idf_t)^2), in float64 (1 where a row is empty)
    score_r    ifd_r x sum_t count_rt x g_t / norm_r, where g_t = idf_t x decay^(picks that used t),
               summed in column order in float64; g = idf before any pick (the initial score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from numba import njit

COUNT_BITS = 7
COUNT_MASK = (1 << COUNT_BITS) - 1
MAX_GAP = (1 << (24 - COUNT_BITS)) - 1
MAX_WHOLE = (1 << 24) - 1  # the largest column or count an escape holds


@njit(inline="always")
def _put(codes, p, v):
    codes[p], codes[p + 1], codes[p + 2] = v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF


@njit(inline="always")
def _word(codes, p):
    return np.int64(codes[p]) | (np.int64(codes[p + 1]) << 8) | (np.int64(codes[p + 2]) << 16)


@njit(cache=True, nogil=True)
def _encode(indptr, cols, counts):
    n = indptr.shape[0] - 1
    starts = np.zeros(n + 1, dtype=np.int64)
    for r in range(n):  # sizes first: one allocation of the codes
        prev, size = 0, 0
        for j in range(indptr[r], indptr[r + 1]):
            c, gap = np.int64(counts[j]), np.int64(cols[j]) - prev
            size += 3 if 1 <= c <= COUNT_MASK and gap <= MAX_GAP else 9
            prev = np.int64(cols[j])
        starts[r + 1] = starts[r] + size
    codes = np.empty(starts[n], dtype=np.uint8)
    for r in range(n):
        prev, p = 0, starts[r]
        for j in range(indptr[r], indptr[r + 1]):
            c, col = np.int64(counts[j]), np.int64(cols[j])
            gap = col - prev
            if 1 <= c <= COUNT_MASK and gap <= MAX_GAP:
                _put(codes, p, (gap << COUNT_BITS) | c)
                p += 3
            else:
                _put(codes, p, 0)
                _put(codes, p + 3, col)
                _put(codes, p + 6, c)
                p += 9
            prev = col
    return starts, codes


def encode_counts(counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """A CSR matrix of whole counts (columns sorted within rows, < 2^24) -> (starts, codes): row r is
    codes[starts[r]:starts[r + 1]], int64 starts and uint8 codes."""
    counts.sum_duplicates()  # sorted columns, one entry each
    if counts.shape[1] > MAX_WHOLE + 1:
        raise ValueError(f"coded rows hold up to 2^24 columns, not {counts.shape[1]:,}")
    if counts.nnz and counts.data.max() > MAX_WHOLE:
        raise ValueError(f"an n-gram counted {int(counts.data.max()):,} times in one response (> 2^24 - 1)")
    return _encode(counts.indptr.astype(np.int64), counts.indices, counts.data)


@njit(cache=True, nogil=True)
def decode_row(codes, a, b):
    """(columns, counts) of the row held in codes[a:b]."""
    cols, counts = np.empty((b - a) // 3, dtype=np.int64), np.empty((b - a) // 3, dtype=np.int64)
    m, col, p = 0, 0, a
    while p < b:
        e = _word(codes, p)
        p += 3
        c = e & COUNT_MASK
        if c != 0:
            col += e >> COUNT_BITS
        else:
            col, c = _word(codes, p), _word(codes, p + 3)
            p += 6
        cols[m], counts[m] = col, c
        m += 1
    return cols[:m], counts[:m]


@njit(cache=True, nogil=True)
def row_sum(codes, a, b, g):
    """sum_t count_t x g_t over the row in codes[a:b], in column order, in float64: the one sum of a
    row's score wherever it is computed. It decodes as decode_row does, inline: this is the greedy's
    hot loop (10^8 re-evaluations at 10^7 rows), where decode_row's two arrays per call would cost."""
    s, col, p = 0.0, 0, a
    while p < b:
        e = _word(codes, p)
        p += 3
        c = e & COUNT_MASK
        if c != 0:
            col += e >> COUNT_BITS
        else:
            col, c = _word(codes, p), _word(codes, p + 3)
            p += 6
        s += c * g[col]
    return s


@njit(cache=True, nogil=True)
def decay_row(codes, a, b, g, decay):
    """A pick: every term of its row decays (g_t *= decay), once per term."""
    cols, _ = decode_row(codes, a, b)
    for j in range(cols.shape[0]):
        g[cols[j]] *= decay


@njit(cache=True, nogil=True)
def _norms_and_scores(starts, codes, idf, ifd, norms, initial):
    """Each row's l2 norm of count x idf and its score before any pick; returns the non-zeros."""
    nnz = 0
    for r in range(norms.shape[0]):
        cols, counts = decode_row(codes, starts[r], starts[r + 1])
        s2 = 0.0
        for j in range(cols.shape[0]):
            w = counts[j] * idf[cols[j]]
            s2 += w * w
        nnz += cols.shape[0]
        norms[r] = np.sqrt(s2) if s2 > 0 else 1.0
        initial[r] = ifd[r] * (row_sum(codes, starts[r], starts[r + 1], idf) / norms[r])
    return nnz


def norms_and_scores(starts, codes, idf: np.ndarray, ifd: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(norm of each row, its initial score, the rows' non-zeros); `idf` float64 (see module docstring)."""
    n = starts.shape[0] - 1
    norms, initial = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64)
    nnz = _norms_and_scores(starts, codes, idf, np.asarray(ifd, dtype=np.float64), norms, initial)
    return norms, initial, int(nnz)


@dataclass
class CodedRows:
    """The candidates' hashed rows, in memory or memory-mapped shards: candidate c is row local_of[c]
    of shards[shard_of[c]] = (starts, codes); norms and initial per candidate; idf (float64, 2^24)."""

    shards: list[tuple[np.ndarray, np.ndarray]]
    shard_of: np.ndarray
    local_of: np.ndarray
    norms: np.ndarray
    initial: np.ndarray
    idf: np.ndarray

    def row(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, counts) of candidate c."""
        starts, codes = self.shards[self.shard_of[c]]
        r = self.local_of[c]
        return decode_row(codes, starts[r], starts[r + 1])


def coded_rows(counts: sp.csr_matrix, idf: np.ndarray, ifd: np.ndarray) -> CodedRows:
    """CodedRows of one in-memory counts matrix (the whole window's candidates)."""
    starts, codes = encode_counts(counts)
    idf = np.asarray(idf, dtype=np.float64)
    norms, initial, _ = norms_and_scores(starts, codes, idf, ifd)
    n = counts.shape[0]
    return CodedRows(
        [(starts, codes)], np.zeros(n, np.int32), np.arange(n, dtype=np.int64), norms, initial, idf
    )
