"""TF-IDF of response texts, as the official selection builds it: scikit-learn's
TfidfVectorizer(ngram_range=(1, 3)) with its defaults (lowercase, word tokens of 2+ characters,
smooth idf, l2 rows), over each response + the tokenizer's eos token.

`exact` keeps scikit-learn's vocabulary of every n-gram: fine to a few hundred thousand responses,
then its Python dict of n-grams outgrows memory. `hashed` maps n-grams to 2^22 columns with
HashingVectorizer and applies the same IDF and normalisation: bounded memory, parallel over chunks,
and the same picks up to hash collisions (measured in benchmarks/bench_selection.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import scipy.sparse as sp

NGRAMS = (1, 3)
HASH_FEATURES = 1 << 22
EXACT_MAX_DOCS = 200_000  # `auto` switches to hashed above this many responses


def _hash_counts(texts: list[str]) -> sp.csr_matrix:
    from sklearn.feature_extraction.text import HashingVectorizer

    hv = HashingVectorizer(ngram_range=NGRAMS, n_features=HASH_FEATURES, alternate_sign=False, norm=None,
                           dtype=np.float32)
    return hv.transform(texts).tocsr()


def tfidf_matrix(texts: list[str], mode: str = "auto", workers: int | None = None) -> sp.csr_matrix:
    """(documents x terms) TF-IDF rows, l2-normalised. mode: exact | hashed | auto."""
    from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer

    if mode == "auto":
        mode = "exact" if len(texts) <= EXACT_MAX_DOCS else "hashed"
    if mode == "exact":
        return TfidfVectorizer(ngram_range=NGRAMS).fit_transform(texts).tocsr()
    if mode != "hashed":
        raise ValueError(f"tfidf mode {mode!r}: expected exact, hashed or auto")
    workers = workers or min(4, os.cpu_count() or 1)
    chunk = max(1, -(-len(texts) // (workers * 4)))
    parts = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    if workers > 1 and len(parts) > 1:
        with ProcessPoolExecutor(workers) as pool:
            counts = sp.vstack(list(pool.map(_hash_counts, parts)), format="csr")
    else:
        counts = sp.vstack([_hash_counts(p) for p in parts], format="csr")
    return TfidfTransformer().fit_transform(counts).tocsr()


def response_texts(responses: list[str], eos_token: str | None) -> list[str]:
    """What the official code vectorises: the response followed by the eos token (when a model is known)."""
    return [r + eos_token for r in responses] if eos_token else list(responses)
