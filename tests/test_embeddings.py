"""Stored response embeddings: the seeded random projection (scoring.embedding_dim), float16 storage
(scoring.embedding_dtype), and the Scorer's embedding column under both."""

import hashlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iterit.config import DatasetConfig, config_from_dict
from iterit.data import ingest, read_samples
from iterit.errors import IteritError
from iterit.scoring.actor import Scorer, load_model, template_rows
from iterit.scoring.losses import project_embeddings, projection_matrix, score_templated
from iterit.templates import Templated

MAX_LEN = 96  # as test_scoring: the mixed corpus' "no-room" row is then a response_truncated reject


def unit_rows(n: int, h: int, seed: int, clusters: int = 0) -> np.ndarray:
    """n random unit vectors in h dims; with clusters, around that many centres (cosines up to ~0.75)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h))
    if clusters:
        x = 0.7 * x + np.repeat(rng.standard_normal((clusters, h)), -(-n // clusters), axis=0)[:n]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def matrix_digest(hidden: int, dim: int) -> str:
    return hashlib.sha256(projection_matrix(hidden, dim).tobytes()).hexdigest()


# ---- the pure core


def test_the_projection_is_one_matrix_in_every_process():
    m = projection_matrix(576, 256)
    assert m.shape == (576, 256) and m.dtype == np.float32 and not m.flags.writeable
    assert projection_matrix(576, 256) is m  # cached per (hidden, dim)
    projection_matrix.cache_clear()
    np.testing.assert_array_equal(projection_matrix(576, 256), m)  # rebuilt from scratch: the same bits
    code = (
        "import hashlib; from iterit.scoring.losses import projection_matrix as p; "
        "print(hashlib.sha256(p(576, 256).tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == matrix_digest(576, 256)
    # Pinned entries: a numpy that changed how the matrix is drawn would silently mix embeddings of two
    # different projections in one run (resumed stages, mixed images); the raw PCG64 stream is stable.
    np.testing.assert_allclose(m[0, :3], [0.0515963, 0.0303664, -0.03847713], atol=1e-6)
    # Entries N(0, 1/dim); another size or seed is another matrix.
    assert abs(float(m.mean())) < 1e-3 and abs(float(m.std()) * 16 - 1) < 0.01
    assert not np.array_equal(projection_matrix(576, 256, seed=1), m)
    assert not np.array_equal(projection_matrix(576, 128)[:, :128], m[:, :128])


def test_projected_rows_have_the_dim_and_unit_norm():
    x = unit_rows(50, 576, seed=0)
    y = project_embeddings(x, 256)
    assert y.shape == (50, 256) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(project_embeddings(3.0 * x, 256), y, atol=1e-6)  # normalised last
    np.testing.assert_allclose(project_embeddings(x[:7], 256), y[:7], atol=1e-6)  # rows independent
    x[3] = 0.0  # a sample without an embedding stays zeros, never NaN
    z = project_embeddings(x, 256)
    assert np.all(z[3] == 0) and np.isfinite(z).all()
    assert project_embeddings(x, 2).shape == (50, 2)


def test_dim_none_is_the_embedding_untouched():
    x = unit_rows(10, 64, seed=1)
    assert project_embeddings(x, None) is x  # today's embedding, bit for bit (no copy, no renormalising)


def test_the_projection_keeps_cosine_similarities_jl():
    x = unit_rows(200, 576, seed=3, clusters=10)
    iu = np.triu_indices(200, 1)
    full = (x @ x.T)[iu]  # 19,900 pairs, cosines from about -0.2 to 0.75
    assert full.max() > 0.6

    def error(d):
        y = project_embeddings(x, d)
        return (y @ y.T)[iu] - full

    e256 = error(256)
    # Johnson-Lindenstrauss: each cosine moves by about 1/sqrt(d) (0.06 at d = 256); measured mean
    # |error| 0.052, max 0.28 over these pairs, correlation 0.95.
    assert np.mean(np.abs(e256)) < 0.07 and np.max(np.abs(e256)) < 0.35
    assert np.corrcoef(full, full + e256)[0, 1] > 0.93
    assert np.mean(np.abs(error(64))) > 1.5 * np.mean(np.abs(e256))  # fewer dims, larger errors


def test_float16_storage_round_trips(tmp_path):
    y = project_embeddings(unit_rows(100, 576, seed=4), 256)
    col = pa.FixedSizeListArray.from_arrays(pa.array(y.astype(np.float16).reshape(-1), pa.float16()), 256)
    pq.write_table(pa.table({"embedding": col}), tmp_path / "e.parquet")
    back = pq.read_table(tmp_path / "e.parquet").column("embedding").combine_chunks()
    assert back.type.value_type == pa.float16()
    got = back.flatten().to_numpy().astype(np.float32).reshape(100, 256)
    assert np.max(np.abs(got - y)) < 1e-3  # half a float16 step below 1: 2.4e-4
    assert np.max(np.abs(got @ got.T - y @ y.T)) < 1e-3  # cosines too


# ---- the config keys


def test_config_keys_and_their_checks():
    base = {"base_model": "m", "datasets": [{"path": "d"}]}
    sc = config_from_dict(base).scoring
    assert (sc.embedding_dim, sc.embedding_dtype) == (None, "float32")
    sc = config_from_dict({**base, "scoring": {"embedding_dim": 256, "embedding_dtype": "float16"}}).scoring
    assert (sc.embedding_dim, sc.embedding_dtype) == (256, "float16")
    for bad in (1, 0, -4):
        with pytest.raises(IteritError, match="'scoring.embedding_dim' = "):
            config_from_dict({**base, "scoring": {"embedding_dim": bad}})
    with pytest.raises(IteritError, match="'scoring.embedding_dtype' = 'bfloat16'"):
        config_from_dict({**base, "scoring": {"embedding_dtype": "bfloat16"}})


# ---- the Scorer's embedding column


@pytest.fixture(scope="module")
def samples_table(mixed_corpus, tmp_path_factory) -> pa.Table:
    summary = ingest([DatasetConfig(path=str(mixed_corpus))], str(tmp_path_factory.mktemp("ingest")))
    return read_samples(summary["samples"])


def scorer_config(model_dir, **scoring):
    return config_from_dict(
        {
            "base_model": model_dir,
            "datasets": [{"path": "unused"}],
            "sequence_len": MAX_LEN,
            "scoring": {"token_budget": 1024, **scoring},
        }
    )


def templated_and_embedding(cfg, samples_table):
    """(the Scorer's input as template_rows makes it, today's embedding of its live rows straight from
    score_templated, the live row mask)."""
    batch = template_rows(samples_table, cfg=cfg)
    live = np.array([not r for r in batch.column("reject").to_pylist()])
    rows = batch.to_pylist()
    samples = [
        Templated(r["cond_ids"], r["cond_start"], r["prior_ids"], r["prior_start"], r["span_len"])
        for r, ok in zip(rows, live)
        if ok
    ]
    model = load_model(cfg.base_model, "float32")
    return batch, score_templated(model, samples, cfg.scoring.token_budget, pad_id=0).embedding, live


def embedding_column(table: pa.Table) -> tuple[pa.DataType, np.ndarray]:
    col = table.column("embedding").combine_chunks()
    return col.type, col.flatten().to_numpy().astype(np.float32).reshape(len(col), col.type.list_size)


def test_scorer_default_embedding_is_todays_bit_for_bit(tiny_model_dir, samples_table):
    cfg = scorer_config(tiny_model_dir)
    batch, want, live = templated_and_embedding(cfg, samples_table)
    assert (~live).sum() == 1  # the no-room row
    typ, got = embedding_column(Scorer(cfg)(batch))
    assert typ == pa.list_(pa.float32(), 64)  # the tiny model's hidden size
    np.testing.assert_array_equal(got[live], want)
    assert np.all(got[~live] == 0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_scorer_projects_and_stores_the_configured_dim_and_dtype(tiny_model_dir, samples_table, dtype):
    cfg = scorer_config(tiny_model_dir, embedding_dim=16, embedding_dtype=dtype)
    batch, full, live = templated_and_embedding(cfg, samples_table)
    out = Scorer(cfg)(batch)
    typ, got = embedding_column(out)
    assert typ == pa.list_(pa.float16() if dtype == "float16" else pa.float32(), 16)
    tol = 1e-3 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(got[live], project_embeddings(full, 16), atol=tol)
    np.testing.assert_allclose(np.linalg.norm(got[live], axis=1), 1.0, atol=tol)
    assert np.all(got[~live] == 0)  # rejected rows keep zeros
    assert out.column("reject").to_pylist().count("response_truncated") == 1
