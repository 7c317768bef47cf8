"""Scoring: the batched, span-only core against the per-sample reference; the Ray Data pipeline
(every id exactly once, a crashed actor restarted); the command line."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from iterit.config import DatasetConfig, config_from_dict
from iterit.data import ingest, read_samples
from iterit.errors import RowError
from iterit.rundir import read_scores, score_parts
from iterit.scoring import losses
from iterit.scoring.actor import load_model
from iterit.scoring.losses import plan_micro_batches, reference_scores, score_templated
from iterit.templates import template_batch

MAX_LEN = 96


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(tiny_model_dir, "float32")


@pytest.fixture(scope="module")
def templated(tiny_tokenizer, mixed_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    summary = ingest([DatasetConfig(path=str(mixed_corpus))], str(out))
    table = read_samples(summary["samples"])
    results = template_batch(tiny_tokenizer, table.column("messages").to_pylist(), MAX_LEN)
    ids = table.column("id").to_pylist()
    return summary["samples"], dict(zip(ids, results))


def test_mixed_corpus_templating(templated):
    _, by_id = templated
    assert isinstance(by_id["no-room"], RowError) and by_id["no-room"].reason == "response_truncated"
    cut = by_id["cut-response"]
    assert len(cut.cond_ids) == MAX_LEN and cut.span_len == MAX_LEN - cut.cond_start


def test_batched_scores_equal_the_per_sample_reference(tiny_model, templated):
    _, by_id = templated
    ids = [i for i, t in by_id.items() if not isinstance(t, RowError)]
    samples = [by_id[i] for i in ids]
    got = score_templated(tiny_model, samples, token_budget=512, pad_id=0)
    ref = np.array([reference_scores(tiny_model, t) for t in samples])
    np.testing.assert_allclose(got.loss_cond, ref[:, 0], rtol=1e-4)
    np.testing.assert_allclose(got.loss_prior, ref[:, 1], rtol=1e-4)
    np.testing.assert_allclose(got.ifd, np.exp(ref[:, 0] - ref[:, 1]), rtol=1e-4)
    assert (
        got.embedding.shape == (len(ids), tiny_model.config.hidden_size) and got.embedding.dtype == np.float32
    )
    np.testing.assert_allclose(np.linalg.norm(got.embedding, axis=1), 1.0, rtol=1e-5)
    again = score_templated(tiny_model, samples[::-1], token_budget=128, pad_id=0)  # other order and batching
    np.testing.assert_allclose(again.loss_cond[::-1], got.loss_cond, rtol=1e-5)
    np.testing.assert_allclose(again.embedding[::-1], got.embedding, atol=1e-5)


def test_conditional_pass_only_runs_half_the_sequences(tiny_model, templated):
    _, by_id = templated
    samples = [t for t in by_id.values() if not isinstance(t, RowError)]
    both = score_templated(tiny_model, samples, token_budget=512, pad_id=0)
    cond = score_templated(tiny_model, samples, token_budget=512, pad_id=0, prior=False)
    np.testing.assert_allclose(cond.loss_cond, both.loss_cond, rtol=1e-5)
    assert np.isnan(cond.loss_prior).all() and cond.embedding is None
    assert cond.real_tokens == sum(len(t.cond_ids) for t in samples)
    assert both.real_tokens == cond.real_tokens + sum(len(t.prior_ids) for t in samples)


def test_embedding_is_the_mean_of_the_prior_span(tiny_model, templated):
    _, by_id = templated
    t = by_id["alpaca"]
    with torch.no_grad():
        h = tiny_model.base_model(input_ids=torch.tensor([t.prior_ids])).last_hidden_state[0]
    want = h[t.prior_start : t.prior_start + t.span_len].mean(0)
    want = (want / want.norm()).numpy()
    got = score_templated(tiny_model, [t], 4096, pad_id=0).embedding[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_only_span_rows_reach_the_output_head(tiny_model, templated):
    _, by_id = templated
    samples = [t for t in by_id.values() if not isinstance(t, RowError)]
    rows_seen = []
    hook = tiny_model.get_output_embeddings().register_forward_hook(
        lambda m, i, o: rows_seen.append(i[0].shape[0])
    )
    try:
        score_templated(tiny_model, samples, 4096, pad_id=0)
    finally:
        hook.remove()
    predicted = sum(2 * t.span_len for t in samples)  # every span token is predicted (starts > 0)
    assert sum(rows_seen) == predicted


def test_micro_batches_respect_the_budget_and_keep_padding_low():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(20, 600, size=512))
    plan = plan_micro_batches(lengths, 4096)
    assert sorted(i for mb in plan for i in mb) == list(range(512))
    assert all(len(mb) * max(lengths[i] for i in mb) <= 4096 for mb in plan)
    computed = sum(len(mb) * max(lengths[i] for i in mb) for mb in plan)
    assert 1 - sum(lengths) / computed < 0.10
    assert plan_micro_batches([9000, 10], 4096) == [[0], [1]]  # longer than the budget: alone


def test_oom_halves_the_micro_batch_and_retries(tiny_model, templated, monkeypatch):
    _, by_id = templated
    samples = [t for t in by_id.values() if not isinstance(t, RowError)]
    want = score_templated(tiny_model, samples, 4096, pad_id=0)
    real = losses.span_nll_and_hidden
    sizes, done = [], []

    def flaky(model, seqs, *a, **k):
        sizes.append(len(seqs))
        if len(seqs) > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        done.append(len(seqs))
        return real(model, seqs, *a, **k)

    monkeypatch.setattr(losses, "span_nll_and_hidden", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = score_templated(tiny_model, samples, 4096, pad_id=0)
    assert sizes[0] == 2 * len(samples) and max(done) <= 3 and sum(done) == 2 * len(samples)
    assert got.oom_splits == len(sizes) - len(done) > 0 and want.oom_splits == 0  # one per halving
    np.testing.assert_allclose(got.loss_cond, want.loss_cond, rtol=1e-6)
    np.testing.assert_allclose(got.loss_prior, want.loss_prior, rtol=1e-6)


# ---- the Ray Data pipeline


def scoring_config(model_dir, out, **scoring):
    return config_from_dict(
        {
            "base_model": model_dir,
            "datasets": [{"path": "unused"}],
            "output_dir": str(out),
            "sequence_len": MAX_LEN,
            "scoring": {
                "batch_size": 4,
                "token_budget": 1024,
                "max_actors": 1,
                "cpus_per_actor": 1,
                "template_cpus": 0.25,
                **scoring,
            },
        }
    )


def test_pipeline_scores_every_id_once(ray_local, tiny_model_dir, tiny_model, templated, tmp_path):
    from iterit.scoring.pipeline import run_scoring

    samples_path, by_id = templated
    summary = run_scoring(
        scoring_config(tiny_model_dir, tmp_path), samples_path, str(tmp_path), log=lambda *_: None
    )
    table = read_scores(summary["scores"])
    # docs/architecture.md section 3's columns first, then what the summary and rejects.jsonl are built from
    assert table.schema.names == [
        "id",
        "ifd",
        "loss_cond",
        "loss_prior",
        "n_prompt_tokens",
        "n_response_tokens",
        "embedding",
        "source",
        "row",
        "reject",
        "detail",
        "real_tokens",
        "computed_tokens",
    ]
    assert set(table.column("reject").to_pylist()) == {""}  # the readers return scored rows only
    emb_type = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.value_type == pa.float32()
    rejects = [json.loads(line) for line in open(summary["rejects"])]
    assert [r["id"] for r in rejects] == ["no-room"] and rejects[0]["reason"] == "response_truncated"
    assert sorted(table.column("id").to_pylist() + ["no-room"]) == sorted(by_id)
    got = {r["id"]: r for r in table.to_pylist()}
    for sid, t in by_id.items():
        if isinstance(t, RowError):
            continue
        c, p = reference_scores(tiny_model, t)
        assert got[sid]["loss_cond"] == pytest.approx(c, rel=1e-4) and got[sid][
            "loss_prior"
        ] == pytest.approx(p, rel=1e-4)
        assert (got[sid]["n_prompt_tokens"], got[sid]["n_response_tokens"]) == (t.cond_start, t.span_len)
    assert summary["scored"] + summary["rejected"] == summary["rows"] == len(by_id)


def test_a_crashed_actor_is_restarted_and_no_id_is_lost_or_doubled(
    ray_local, tiny_model_dir, templated, tmp_path
):
    from iterit.scoring.actor import CRASH_ONCE_ENV
    from iterit.scoring.pipeline import run_scoring

    samples_path, by_id = templated
    marker = tmp_path / "crashed"
    summary = run_scoring(
        scoring_config(tiny_model_dir, tmp_path, embeddings=False),
        samples_path,
        str(tmp_path),
        actor_env={CRASH_ONCE_ENV: str(marker)},
        log=lambda *_: None,
    )
    assert marker.exists()  # the actor did die on its first batch
    ids = read_scores(summary["scores"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(by_id) - 1 and summary["rejected"] == 1


def test_score_command(ray_local, tiny_model_dir, mixed_corpus, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(
        tmp_path
    )  # a relative --output, as `make demo`'s runs/demo: Ray's workers run elsewhere
    code, out, _ = cli(
        [
            "score",
            "--model",
            tiny_model_dir,
            "--data",
            str(mixed_corpus),
            "--output",
            "s",
            "--max-length",
            str(MAX_LEN),
            "--set",
            "scoring.batch_size=8",
            "--set",
            "scoring.template_cpus=0.25",
        ]
    )
    assert code == 0 and "scored 19 samples" in out and "response_truncated 1" in out
    assert read_scores(str(tmp_path / "s" / "scores")).num_rows == 19
    rejects = [json.loads(line) for line in open(tmp_path / "s" / "rejects.jsonl")]
    assert len(rejects) == 1


def test_a_pool_that_cannot_fit_is_one_clear_line(ray_local, monkeypatch):
    from iterit import cluster
    from iterit.errors import IteritError

    sc = scoring_config("m", "o", min_actors=3, max_actors=3, cpus_per_actor=1, template_cpus=0.5).scoring
    warnings = []
    monkeypatch.setattr(cluster, "is_local", lambda: False)  # a cluster: the autoscaler may add nodes
    cluster.check_pool_fits(sc, 0.0, log=warnings.append)
    assert "needs 4 CPUs (3 actors x 1 + 1 for reading and templating)" in warnings[0]
    monkeypatch.setattr(cluster, "is_local", lambda: True)  # a Ray started on this machine cannot grow
    with pytest.raises(IteritError, match="torch_threads=<cores>"):
        cluster.check_pool_fits(sc, 0.0)
    with pytest.raises(IteritError, match="and 1 GPUs; the cluster has 3 CPUs and 0 GPUs"):
        cluster.check_pool_fits(scoring_config("m", "o").scoring, 1.0)
    one = scoring_config("m", "o", min_actors=2, max_actors=2, cpus_per_actor=1).scoring
    cluster.check_pool_fits(one, 0.0)  # 2 actors + 1: fits, no error
    with pytest.raises(IteritError, match=r"\+ 2 for reading and templating and the resume filter"):
        cluster.check_pool_fits(one, 0.0, extra_cpus=1.0)  # a resume also runs Ray Data's filter actor


def test_custom_resources_per_actor_are_checked_and_validated(ray_local, monkeypatch):
    """scoring.resources_per_actor: the pool's minimum must find them on the cluster; CPU and GPU
    have their own keys, and amounts are not negative."""

    from iterit import cluster
    from iterit.errors import IteritError

    pinned = scoring_config("m", "o", min_actors=2, max_actors=2, resources_per_actor={"scorer": 1}).scoring
    monkeypatch.setattr(cluster, "is_local", lambda: True)
    with pytest.raises(IteritError, match=r"needs 2 scorer \(2 actors x 1\); the cluster has 0"):
        cluster.check_pool_fits(pinned, 0.0)
    warnings = []
    monkeypatch.setattr(cluster, "is_local", lambda: False)
    cluster.check_pool_fits(pinned, 0.0, log=warnings.append)
    assert warnings == [
        "warning: scoring needs 2 scorer (2 actors x 1); the cluster has 0; waiting until the autoscaler adds them"
    ]
    for bad, says in [({"CPU": 1}, "cpus_per_actor"), ({"scorer": -1}, ">= 0")]:
        with pytest.raises(IteritError, match=says):
            scoring_config("m", "o", resources_per_actor=bad)


@pytest.fixture(scope="module")
def scored_once(ray_local, tiny_model_dir, templated, tmp_path_factory):
    """A finished scoring folder of `templated` (no embeddings): the one the damage tests copy and cut."""
    from iterit.scoring.pipeline import run_scoring

    out = tmp_path_factory.mktemp("scored_once")
    cfg = scoring_config(tiny_model_dir, out, embeddings=False)
    return out, run_scoring(cfg, templated[0], str(out), log=lambda *_: None)


@pytest.mark.parametrize("stopped", ["finished", "mid-stage"])
def test_a_damaged_part_is_named_removed_and_its_ids_scored_again(
    ray_local, tiny_model_dir, templated, scored_once, tmp_path, stopped
):
    """A part cut short (its footer gone, as a node lost mid-write leaves it) is never trusted on the next
    run: one line names it, it is removed, and the ids no readable part holds are scored again, once,
    to the numbers of the whole run; in a finished folder and in one whose id checkpoint remains."""
    import shutil

    from iterit.scoring.pipeline import run_scoring

    done, first = scored_once
    shutil.copytree(done, tmp_path, dirs_exist_ok=True)
    cols = ["id", "loss_cond", "loss_prior", "reject"]
    whole = {r["id"]: r for r in iter_all(first["scores"], cols)}
    parts = score_parts(str(tmp_path / "scores"))
    assert len(parts) > 1
    cut = Path(parts[1])
    lost = pq.read_table(cut, columns=["id"]).column("id").to_pylist()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    if stopped == "mid-stage":  # Ray Data's checkpoint folder of a stage stopped halfway
        (tmp_path / "scores.checkpoint").mkdir()
    said = []
    cfg = scoring_config(tiny_model_dir, tmp_path, embeddings=False)
    again = run_scoring(cfg, templated[0], str(tmp_path), log=said.append)
    damaged = [line for line in said if "damaged (" in line]
    assert len(damaged) == 1 and damaged[0].strip().startswith(f"{cut}: damaged ("), said
    assert f"{len(lost):,} ids to score again" in "\n".join(said)
    rows = iter_all(again["scores"], cols)
    assert sorted(r["id"] for r in rows) == sorted(whole)  # every id once
    for r in rows:
        assert r["reject"] == whole[r["id"]]["reject"]
        if not r["reject"]:
            assert r["loss_cond"] == pytest.approx(whole[r["id"]]["loss_cond"], rel=1e-6)
    assert again["rows"] == first["rows"] and again["scored_rows"] == len(lost)
    assert not cut.exists() and not (tmp_path / "scores.checkpoint").exists()


def iter_all(path, columns):
    from iterit.rundir import iter_scores

    return [r for t in iter_scores(path, columns, scored_only=False) for r in t.to_pylist()]
