"""TF-IDF of response texts, as the official selection builds it: scikit-learn's
TfidfVectorizer(ngram_range=(1, 3)) with its defaults (lowercase, word tokens of 2+ characters,
smooth idf, l2 rows), over each response + the tokenizer's eos token.

`exact` computes that same matrix (the same weights; columns in another order, which no selection
depends on) about 5x faster than TfidfVectorizer: words become integer ids once, and every 1-, 2- and
3-gram is an exact integer key built with numpy, instead of a Python string per n-gram looked up in a
dict. Above ~2M distinct words the keys would not fit 63 bits and it falls back to TfidfVectorizer.
`hashed` maps n-grams to 2^24 columns (hash_counts: the same words and n-grams, hashed by a compiled
scan of the texts' code points) and applies the same
IDF and l2 norm: bounded memory, parallel over chunks (or over the cluster: selection.shards), the
same picks up to hash collisions (agreement measured in benchmarks/bench_selection.py).
`auto` is exact up to 200,000 responses, hashed above.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import scipy.sparse as sp
from numba import njit

NGRAMS = (1, 3)
HASH_FEATURES = 1 << 24
EXACT_MAX_DOCS = 200_000  # `auto` switches to hashed above this many responses


_WORD = re.compile(r"(?u)\b\w\w+\b")  # TfidfVectorizer's default token_pattern


def _words(texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """TfidfVectorizer's tokens as integer ids: (ids of every token, in order; tokens per text; the
    distinct words, id order = first appearance). pandas' factorize hashes in C: ~3x a Python dict."""
    import pandas as pd

    per_text = [_WORD.findall(text.lower()) for text in texts]
    lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
    flat = np.empty(int(lengths.sum()), dtype=object)
    flat[:] = list(itertools.chain.from_iterable(per_text))
    ids, vocab = pd.factorize(flat)
    return ids.astype(np.int64), lengths, list(vocab)


def _ngram_starts(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document of every token, the positions where a bigram starts, where a trigram starts): an
    n-gram never crosses from one document into the next."""
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    end = np.repeat(np.cumsum(lengths), lengths)  # one past each token's document
    pos = np.arange(int(lengths.sum()), dtype=np.int64)
    return doc, pos[pos + 1 < end], pos[pos + 2 < end]


@functools.cache
def _word_chars() -> np.ndarray:
    """True at every code point that the token pattern's \\w matches (re's Unicode word characters:
    str.isalnum() or "_"), a table of 0x110000 booleans built once per process (~0.3 s)."""
    table = np.fromiter((chr(c).isalnum() for c in range(0x110000)), dtype=np.bool_, count=0x110000)
    table[ord("_")] = True
    return table


_U64 = np.uint64
_M1, _M2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9)  # splitmix64
_FNV_OFFSET, _FNV_PRIME = _U64(0xCBF29CE484222325), _U64(0x100000001B3)  # FNV-1a, 64 bits


@njit(inline="always")
def _mix(a, b):
    """A 64-bit hash of the pair (a, b): splitmix64's finaliser (uint64 arithmetic wraps, as intended)."""
    x = (a * _M1) ^ (b + _M2)
    x ^= x >> _U64(31)
    x *= _M2
    return x ^ (x >> _U64(29))


@njit(inline="always")
def _utf8_at(b, pos):
    """(code point, next position) of the UTF-8 sequence at b[pos] (Python's encoding of a str, lone
    surrogates passed through as 3-byte sequences)."""
    b0 = np.int64(b[pos])
    if b0 < 0x80:
        return b0, pos + 1
    if b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (np.int64(b[pos + 1]) & 0x3F), pos + 2
    if b0 < 0xF0:
        return ((b0 & 0x0F) << 12) | ((np.int64(b[pos + 1]) & 0x3F) << 6) | (
            np.int64(b[pos + 2]) & 0x3F
        ), pos + 3
    cp = ((b0 & 0x07) << 18) | ((np.int64(b[pos + 1]) & 0x3F) << 12) | ((np.int64(b[pos + 2]) & 0x3F) << 6)
    return cp | (np.int64(b[pos + 3]) & 0x3F), pos + 4


@njit(cache=True, nogil=True)
def _hashed_ngram_counts(utf8, text_ends, is_word, mask):
    """Every text's 1-3-gram counts in hashed columns, from the lowercased texts' UTF-8 bytes end to end
    (`text_ends[i]`: one past text i). Tokens are maximal runs of 2+ word characters (exactly what the
    pattern \\b\\w\\w+\\b finds), a word's hash FNV-1a over its code points, an n-gram's column its
    words' hashes mixed in order (_mix), masked to the table's size. Returns CSR (indptr, columns
    sorted within each row, counts)."""
    n = text_ends.shape[0]
    indptr = np.zeros(n + 1, dtype=np.int64)
    cap = max(1024, utf8.shape[0] // 2)
    cols_out = np.empty(cap, dtype=np.int32)
    counts_out = np.empty(cap, dtype=np.float32)
    at, pos = 0, 0
    buf = np.empty(1024, dtype=np.int64)
    for d in range(n):
        end = text_ends[d]
        if buf.shape[0] < 3 * (end - pos) // 2 + 3:  # a token takes 2+ bytes and a separator
            buf = np.empty(3 * (end - pos) // 2 + 3, dtype=np.int64)
        m, words, w1, w2 = 0, 0, _U64(0), _U64(0)
        run, h = 0, _FNV_OFFSET
        while True:
            last = pos >= end
            if not last:
                cp, pos = _utf8_at(utf8, pos)
                if is_word[cp]:
                    h = (h ^ _U64(cp)) * _FNV_PRIME
                    run += 1
                    continue
            if run >= 2:  # a token ends here
                w = _mix(h, _U64(run))
                buf[m] = np.int64(_mix(w, _U64(1)) & mask)
                m += 1
                if words >= 1:
                    buf[m] = np.int64(_mix(_mix(w1, w), _U64(2)) & mask)
                    m += 1
                if words >= 2:
                    buf[m] = np.int64(_mix(_mix(_mix(w2, w1), w), _U64(3)) & mask)
                    m += 1
                w2, w1 = w1, w
                words += 1
            run, h = 0, _FNV_OFFSET
            if last:
                break
        cols = buf[:m]
        cols.sort()
        if at + m > cols_out.shape[0]:  # grow the outputs
            cap = max(2 * cols_out.shape[0], at + m)
            grown_c, grown_n = np.empty(cap, dtype=np.int32), np.empty(cap, dtype=np.float32)
            grown_c[:at], grown_n[:at] = cols_out[:at], counts_out[:at]
            cols_out, counts_out = grown_c, grown_n
        i = 0
        while i < m:
            k = i + 1
            while k < m and cols[k] == cols[i]:
                k += 1
            cols_out[at], counts_out[at] = cols[i], k - i
            at += 1
            i = k
        indptr[d + 1] = at
    return indptr, cols_out[:at].copy(), counts_out[:at].copy()


def hash_counts(texts: list[str]) -> sp.csr_matrix:
    """Raw 1-3-gram counts in 2^24 hashed columns, float32, TfidfVectorizer's tokens (lowercased, runs of
    2+ word characters), CSR with sorted columns. A word's column depends on the word alone: the same
    in every process, chunk and Python. Compiled (numba) over the texts' UTF-8 bytes: no Python string
    per token or n-gram, about 10x faster than the regex and HashingVectorizer."""
    encoded = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
    utf8 = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    indptr, cols, counts = _hashed_ngram_counts(utf8, ends, _word_chars(), np.uint64(HASH_FEATURES - 1))
    return sp.csr_matrix((counts, cols, indptr), shape=(len(texts), HASH_FEATURES))


def exact_tfidf(texts: list[str]) -> sp.csr_matrix:
    """TfidfVectorizer(ngram_range=(1, 3)).fit_transform(texts), up to column order, with integer n-grams."""
    tok, lengths, vocab = _words(texts)
    v = max(1, len(vocab))
    if v + v**2 + v**3 >= 2**63:
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=NGRAMS).fit_transform(texts).tocsr()
    doc, bi, tri = _ngram_starts(lengths)
    # Keys: a (unigram), v + a*v + b (bigram), v + v^2 + (a*v + b)*v + c (trigram): distinct n-grams,
    # distinct keys, as TfidfVectorizer's distinct strings ("a b" never equals a word: words have no space).
    keys = np.concatenate(
        [tok, v + tok[bi] * v + tok[bi + 1], v + v * v + (tok[tri] * v + tok[tri + 1]) * v + tok[tri + 2]]
    )
    rows = np.concatenate([doc, doc[bi], doc[tri]])
    del tok, bi, tri
    terms, cols = np.unique(keys, return_inverse=True)
    counts = sp.csr_matrix((np.ones(len(keys)), (rows, cols.ravel())), shape=(len(texts), len(terms)))
    counts.sum_duplicates()
    return weight_inplace(counts)


def smooth_idf(df: np.ndarray, n: int, dtype=np.float32) -> np.ndarray:
    """TfidfTransformer's default idf: ln((1 + n) / (1 + df)) + 1, for n documents."""
    return (np.log((1 + n) / (1 + df)) + 1.0).astype(dtype)


@njit(cache=True, nogil=True)
def _weight_rows(indptr, indices, data, idf, norms):
    """Each row: counts x idf, then divided by its l2 norm (0 -> 1); the squares summed in float64."""
    for r in range(norms.shape[0]):
        s = 0.0
        for j in range(indptr[r], indptr[r + 1]):
            data[j] = data[j] * idf[indices[j]]
            s += np.float64(data[j]) * np.float64(data[j])
        norms[r] = np.sqrt(s) if s > 0 else 1.0
        for j in range(indptr[r], indptr[r + 1]):
            data[j] = data[j] / norms[r]


def weight_inplace(x: sp.csr_matrix, idf: np.ndarray | None = None) -> sp.csr_matrix:
    """Counts -> TfidfTransformer's defaults (smooth idf, l2 rows), in place: at 10^6 documents the
    matrix is gigabytes, and a transformer's copies would double or triple that. `idf`: given (the
    document frequencies of a larger matrix whose row shard `x` is), else computed from `x`. Each row's
    result depends on that row and the idf only, so a shard weighted with the whole matrix's idf holds
    exactly the rows of the whole matrix weighted at once."""
    x.sum_duplicates()
    if idf is None:
        idf = smooth_idf(np.bincount(x.indices, minlength=x.shape[1]), x.shape[0], x.dtype)
    _weight_rows(x.indptr, x.indices, x.data, np.asarray(idf, dtype=x.dtype), np.empty(x.shape[0], x.dtype))
    return x


def resolved_mode(mode: str, n_docs: int) -> str:
    """exact | hashed for `mode` (exact, hashed or auto) and a window of n_docs responses."""
    if mode == "auto":
        return "exact" if n_docs <= EXACT_MAX_DOCS else "hashed"
    if mode not in ("exact", "hashed"):
        raise ValueError(f"tfidf mode {mode!r}: expected exact, hashed or auto")
    return mode


def hashed_counts(texts: list[str], workers: int | None = None) -> sp.csr_matrix:
    """hash_counts of many texts, over up to 4 processes in parts."""
    workers = workers or min(4, os.cpu_count() or 1)
    chunk = min(20_000, max(1, -(-len(texts) // workers)))  # small parts: each worker holds one at a time
    parts = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    if workers > 1 and len(parts) > 1:
        with ProcessPoolExecutor(workers) as pool:
            counts = list(pool.map(hash_counts, parts))
    else:
        counts = [hash_counts(p) for p in parts]
    return stack_rows(counts) if counts else hash_counts([])


def tfidf_matrix(texts: list[str], mode: str = "auto", workers: int | None = None) -> sp.csr_matrix:
    """(documents x terms) TF-IDF rows, l2-normalised. mode: exact | hashed | auto."""
    if resolved_mode(mode, len(texts)) == "exact":
        return exact_tfidf(texts)
    return weight_inplace(hashed_counts(texts, workers))


def hashed_rows(texts: list[str], ifd: np.ndarray, workers: int | None = None):
    """The hashed mode's rows in memory, as the greedy reads them: coded counts, the idf, each row's norm
    and initial score (selection.coded.CodedRows; what the cluster writes as shards, bit for bit)."""
    from iterit.selection.coded import coded_rows

    counts = hashed_counts(texts, workers)
    idf = smooth_idf(np.bincount(counts.indices, minlength=HASH_FEATURES), counts.shape[0])
    return coded_rows(counts, idf, ifd)


def stack_rows(parts: list[sp.csr_matrix]) -> sp.csr_matrix:
    """sp.vstack for CSR parts that frees each part once copied: the result's pages fill as the
    parts empty, so memory peaks near one matrix, not two."""
    nnz, rows, cols = sum(p.nnz for p in parts), sum(p.shape[0] for p in parts), parts[0].shape[1]
    data = np.empty(nnz, dtype=parts[0].dtype)
    indices = np.empty(nnz, dtype=np.int64 if nnz >= 2**31 else np.int32)
    indptr = np.empty(rows + 1, dtype=np.int64)
    indptr[0] = at = r = 0
    for i in range(len(parts)):
        p, parts[i] = parts[i], None
        data[at : at + p.nnz], indices[at : at + p.nnz] = p.data, p.indices
        indptr[r + 1 : r + 1 + p.shape[0]] = p.indptr[1:] + at
        at, r = at + p.nnz, r + p.shape[0]
    return sp.csr_matrix((data, indices, indptr), shape=(rows, cols))


def response_texts(responses: list[str], eos_token: str | None) -> list[str]:
    """What the official code vectorises: the response followed by the eos token (when a model is known)."""
    return [r + eos_token for r in responses] if eos_token else list(responses)
