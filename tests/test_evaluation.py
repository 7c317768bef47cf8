"""Evaluation: the held-out loss is the per-sample reference span loss aggregated by tokens; GSM8K
answers are extracted, normalised and matched; generation on the actor pool answers every question once."""

import json
import math

import numpy as np
import pytest
import torch

from iterit.config import DatasetConfig, config_from_dict
from iterit.data import ingest, read_samples
from iterit.errors import IteritError, RowError
from iterit.evaluation import (
    Generator,
    aggregate_losses,
    answers_match,
    evaluate_gsm8k,
    evaluate_loss,
    exact_match,
    extract_answer,
    gold_answer,
    read_gsm8k,
    run_eval,
    score_predictions,
)
from iterit.rundir import read_scores

MAX_LEN = 96
QUIET = dict(log=lambda *_: None)


def eval_config(model_dir, out):
    # The session's Ray has 3 logical CPUs: one actor (1 CPU) plus reading and templating (0.5).
    return config_from_dict(
        {
            "base_model": model_dir,
            "datasets": [{"path": "unused"}],
            "output_dir": str(out),
            "sequence_len": MAX_LEN,
            "scoring": {
                "batch_size": 8,
                "token_budget": 1024,
                "min_actors": 1,
                "max_actors": 1,
                "cpus_per_actor": 1,
                "template_cpus": 0.5,
            },
        }
    )


# ---- held-out loss


def test_heldout_loss_is_the_token_weighted_reference_span_loss(
    ray_local, tiny_model_dir, tiny_tokenizer, mixed_corpus, tmp_path
):
    from iterit.scoring.actor import load_model
    from iterit.scoring.losses import reference_scores
    from iterit.templates import template_batch

    out = tmp_path / "eval"
    got = evaluate_loss(eval_config(tiny_model_dir, out), [str(mixed_corpus)], str(out), **QUIET)

    # The reference: every sample templated and scored alone (full logits, batch size 1).
    samples = read_samples(ingest([DatasetConfig(path=str(mixed_corpus))], str(tmp_path / "ref"))["samples"])
    model = load_model(tiny_model_dir, "float32")
    losses, lengths, cond_texts = [], [], []
    for t in template_batch(tiny_tokenizer, samples.column("messages").to_pylist(), MAX_LEN):
        if not isinstance(t, RowError):
            losses.append(reference_scores(model, t)[0])
            lengths.append(t.span_len)
            cond_texts.append(t)
    want = sum(c * n for c, n in zip(losses, lengths)) / sum(lengths)
    assert got["loss"] == pytest.approx(want, rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-4)
    unweighted = sum(losses) / len(losses)
    assert (
        abs(unweighted - want) > 2e-4 * want
    )  # so the first check tells the weighted mean from the plain one
    assert got["mean_sample_loss"] == pytest.approx(unweighted, rel=1e-4)
    assert (got["n"], got["tokens"], got["read"]) == (19, sum(lengths), 20)
    assert got["rejected"] == 1 and got["rejected_by_reason"] == {"response_truncated": 1}
    assert json.loads((out / "loss.json").read_text()) == got
    scores = read_scores(str(out / "scores"))
    assert "embedding" not in scores.column_names  # embeddings off
    # The conditional pass only: no prior pass was run, so no IFD; the work counted is the cond texts'.
    assert (
        np.isnan(scores.column("loss_prior").to_numpy()).all()
        and np.isnan(scores.column("ifd").to_numpy()).all()
    )
    summary = json.loads((out / "score_summary.json").read_text())
    assert summary["tokens"] == sum(len(t.cond_ids) for t in cond_texts)
    assert (out / "ingest" / "samples.parquet").exists()


def test_aggregate_losses_weights_by_tokens():
    got = aggregate_losses(np.array([1.0, 3.0]), np.array([3, 1], dtype=np.int32))
    assert got == {
        "loss": 1.5,
        "ppl": pytest.approx(math.exp(1.5)),
        "mean_sample_loss": 2.0,
        "n": 2,
        "tokens": 4,
    }


# ---- answers


@pytest.mark.parametrize(
    "text,want",
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),  # thousands separators
        ("The total is $1,000.50.", "1000.5"),  # dollars, decimals, a sentence's full stop
        ("It costs $5.00", "5"),  # trailing .00
        ("He ends with 3.", "3"),
        ("The temperature drops to -4 degrees", "-4"),  # negative
        ("She owes -$7", "-7"),
        ("16-3-4=9", "9"),  # subtraction is not a sign
        ("first 7 then #### 42 and later 5", "42"),  # the number after the last ####, not the last number
        ("#### 10 ... #### 11", "11"),
        ("#### none, so the answer is 12", "12"),  # nothing after ####: the last number
        ("Answer: 0.50", "0.5"),
        ("count 1,2,3", "3"),  # commas that are not thousands separators
        ("I do not know", None),  # no number
        ("", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_gold_answer():
    assert gold_answer("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == "18"
    assert gold_answer("... #### 1,080") == "1080"
    assert gold_answer("#### -3") == "-3"
    assert gold_answer("#### $2.50") == "2.5"
    for bad in ("The answer is 18", "#### ", "#### many"):
        with pytest.raises(RowError) as e:
            gold_answer(bad)
        assert e.value.reason == "no_gold_answer"


def test_predictions_are_scored_by_exact_match():
    assert answers_match("18", "18") and answers_match(".5", "0.5") and answers_match("0", "0")
    assert not answers_match("17", "18") and not answers_match(None, "18")
    assert exact_match(["18", "17", None, "1234"], ["18", "18", "3", "1234"]) == 0.5
    with pytest.raises(ValueError):
        exact_match(["1"], ["1", "2"])
    rows = [
        {"id": "a", "question": "q1", "gold": "18"},
        {"id": "b", "question": "q2", "gold": "1234"},
        {"id": "c", "question": "q3", "gold": "3"},
    ]
    recs = score_predictions(
        rows, ["So she makes $18 a day.\n#### 18", "About $1,234.00 in all.", "No idea."]
    )
    assert [(r["prediction"], r["correct"]) for r in recs] == [("18", True), ("1234", True), (None, False)]
    assert recs[0] == {
        "id": "a",
        "question": "q1",
        "gold": "18",
        "prediction": "18",
        "correct": True,
        "output": "So she makes $18 a day.\n#### 18",
    }


# ---- GSM8K generation


@pytest.fixture()
def gsm8k_file(tmp_path):
    rows = [
        {
            "id": "g0",
            "question": "Janet has 16 eggs and eats 3. How many are left?",
            "answer": "16 - 3 = 13\n#### 13",
        },
        {
            "question": "A robe takes 2 bolts of blue and half that of white. How many in total?",
            "answer": "#### 3",
        },
        {"id": "g2", "question": "What is 1,000 plus 234?", "answer": "1,000 + 234 = 1,234\n#### 1,234"},
        {"id": "bad", "question": "No final answer here?", "answer": "It is 5."},  # no ####: a reject
        {"id": "a0", "instruction": "Add two and two.", "input": "", "output": "2 + 2 = 4\n#### 4"},  # Alpaca
        {"id": "g0", "question": "Same id again?", "answer": "#### 1"},  # duplicate_id
        {"id": "g5", "question": "How many legs do 2 cats have?", "answer": "2 * 4 = 8\n#### 8"},
    ]
    p = tmp_path / "gsm8k.jsonl"
    p.write_bytes(
        "".join(json.dumps(r) + "\n" for r in rows).encode()
        + b'{"question": "caf\xe9?", "answer": "#### 1"}\n{"question": "cut off\n'
    )
    return p


def test_read_gsm8k_keeps_good_rows_and_rejects_with_reasons(gsm8k_file):
    rows, rejects = read_gsm8k(str(gsm8k_file))
    assert [r["id"] for r in rows] == ["g0", "gsm8k:1", "g2", "a0", "g5"]
    assert [r["gold"] for r in rows] == ["13", "3", "1234", "4", "8"]
    assert rows[3]["question"] == "Add two and two."
    assert [(r["id"], r["reason"]) for r in rejects] == [
        ("bad", "no_gold_answer"),
        ("g0", "duplicate_id"),
        ("gsm8k:7", "bad_encoding"),
        (None, "invalid_json"),
    ]
    assert [r["id"] for r in read_gsm8k(str(gsm8k_file), limit=3)[0]] == ["g0", "gsm8k:1", "g2"]


def test_gsm8k_on_the_actor_pool_answers_every_question_once(ray_local, tiny_model_dir, gsm8k_file, tmp_path):
    out = tmp_path / "eval"
    cfg = eval_config(tiny_model_dir, out)
    got = run_eval(cfg, None, str(out), gsm8k=str(gsm8k_file), **QUIET)
    g = got["gsm8k"]
    preds = [json.loads(line) for line in open(out / "gsm8k_predictions.jsonl")]
    assert [p["id"] for p in preds] == ["g0", "gsm8k:1", "g2", "a0", "g5"]  # each once, in file order
    assert [p["gold"] for p in preds] == ["13", "3", "1234", "4", "8"]
    for p in preds:
        assert p["prediction"] == extract_answer(p["output"])
        assert p["correct"] == answers_match(p["prediction"], p["gold"])
    assert g["n"] == 5 and g["correct"] == sum(p["correct"] for p in preds)
    assert g["exact_match"] == g["correct"] / g["n"]
    assert g["rejected"] == 4 and g["rejected_by_reason"] == {
        "no_gold_answer": 1,
        "duplicate_id": 1,
        "bad_encoding": 1,
        "invalid_json": 1,
    }
    assert len(open(out / "gsm8k_rejects.jsonl").readlines()) == 4
    assert json.loads((out / "eval.json").read_text()) == got and "loss" not in got

    # The pool ran the same greedy code as an in-process Generator (one batch of 5, one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = Generator(cfg, 256)
        assert gen.generate([r["question"] for r in read_gsm8k(str(gsm8k_file))[0]]) == [
            p["output"] for p in preds
        ]
    finally:
        torch.set_num_threads(threads)
    messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": "Q?"}]
    prompt = gen.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_gsm8k_with_only_bad_rows_is_one_clear_error(tiny_model_dir, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(IteritError, match="no usable GSM8K rows"):
        evaluate_gsm8k(eval_config(tiny_model_dir, tmp_path), str(p), str(tmp_path / "out"), **QUIET)


def test_run_eval_combines_both_into_eval_json(monkeypatch, tiny_model_dir, tmp_path):
    from iterit import evaluation

    calls = []
    monkeypatch.setattr(
        evaluation, "evaluate_loss", lambda cfg, d, o, log: calls.append(("loss", d)) or {"loss": 1.0}
    )
    monkeypatch.setattr(
        evaluation,
        "evaluate_gsm8k",
        lambda cfg, d, o, limit, log: calls.append(("gsm8k", d, limit)) or {"exact_match": 0.5},
    )
    cfg = eval_config(tiny_model_dir, tmp_path)
    got = run_eval(cfg, ["held.jsonl"], str(tmp_path), gsm8k="gsm8k.jsonl", limit=7, **QUIET)
    assert calls == [("loss", ["held.jsonl"]), ("gsm8k", "gsm8k.jsonl", 7)]
    assert got == {"model": tiny_model_dir, "loss": {"loss": 1.0}, "gsm8k": {"exact_match": 0.5}}
    assert json.loads((tmp_path / "eval.json").read_text()) == got
    with pytest.raises(IteritError, match="nothing to evaluate"):
        run_eval(cfg, [], str(tmp_path))


# ---- lm-evaluation-harness (optional): a recording stand-in for the package


def test_lm_eval_tasks_run_through_the_harness_and_land_in_eval_json(monkeypatch, tiny_model_dir, tmp_path):
    import sys
    import types

    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {
            "results": {
                "gsm8k": {
                    "alias": "gsm8k",
                    "exact_match,strict-match": 0.25,
                    "exact_match_stderr,strict-match": 0.1,
                    "flag": True,
                }
            }
        }

    monkeypatch.setitem(
        sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate, __version__="0.4.13")
    )
    cfg = eval_config(tiny_model_dir, tmp_path)
    got = run_eval(cfg, None, str(tmp_path), limit=5, lm_eval_tasks=["gsm8k"], num_fewshot=0, **QUIET)
    (call,) = calls
    assert (
        call["model"] == "hf"
        and call["tasks"] == ["gsm8k"]
        and call["limit"] == 5
        and call["num_fewshot"] == 0
    )
    assert call["model_args"] == {
        "pretrained": tiny_model_dir,
        "dtype": "float32",
        "trust_remote_code": False,
    }
    assert call["device"] == "cpu"
    assert call["apply_chat_template"] is True  # the tiny tokenizer carries a (ChatML) template of its own
    lm = got["lm_eval"]
    assert lm["tasks"] == {
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1}
    }
    assert lm["lm_eval_version"] == "0.4.13"
    assert json.loads((tmp_path / "lm_eval.json").read_text()) == lm
    assert json.loads((tmp_path / "eval.json").read_text())["lm_eval"] == lm


def test_lm_eval_without_the_package_names_the_extra(monkeypatch, tiny_model_dir, tmp_path):
    import sys

    from iterit.evaluation import evaluate_lm_eval, parse_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(IteritError, match=r'pip install "iterit\[lm-eval\]"'):
        evaluate_lm_eval(eval_config(tiny_model_dir, tmp_path), ["gsm8k"], str(tmp_path))
    assert parse_tasks(" gsm8k, arc_easy,,gsm8k ") == ["gsm8k", "arc_easy"]
