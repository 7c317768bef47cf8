"""The proxy scorer's asset is real: Gemma-3-270M assembled from its 4 PyPI chunk packages, converted from
GGUF to a float32 safetensors folder with Gemma 3's chat template, and scored by iterit's core exactly as
by a plain transformers computation."""

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def proxy_model_dir(demo_assets) -> str:
    """Gemma-3-270M's folder, built once per machine (about 75 s) beside the demo assets and cached."""
    from iterit.demo import prepare_demo

    return prepare_demo(log=lambda *_: None, proxy=True)["proxy_model"]


def test_proxy_folder_is_plain_float32_gemma3(proxy_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((Path(proxy_model_dir) / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(proxy_model_dir, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(proxy_model_dir)
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4. "}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert (
        text == "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == tok.convert_tokens_to_ids(["<bos>", "<start_of_turn>"])  # special tokens, one id each


def test_proxy_scores_like_the_reference(proxy_model_dir, demo_assets):
    """One demo ShareGPT conversation: iterit's batched span-only scorer (sdpa) against the per-sample,
    full-logits reference, and the prior text (the response alone) templated, not refused."""
    from iterit.config import DatasetConfig
    from iterit.data import normalise, read_records
    from iterit.errors import RowError
    from iterit.scoring.actor import load_model
    from iterit.scoring.losses import reference_scores, score_templated
    from iterit.templates import load_tokenizer, template_batch

    tok = load_tokenizer(proxy_model_dir)
    ds = DatasetConfig(path="x", type="sharegpt")
    convs = []
    for _, rec in read_records(demo_assets["train"]):
        try:
            convs.append(normalise(rec, ds))
        except RowError:
            continue
        if len(convs) == 20:
            break
    templated = [t for t in template_batch(tok, convs, 128) if not isinstance(t, RowError)]
    assert templated, "no demo conversation fits 128 Gemma tokens"
    sample = templated[0]
    assert sample.prior_ids[: sample.prior_start] == tok.convert_tokens_to_ids(
        ["<bos>", "<start_of_turn>", "model", "\n"]
    )
    model = load_model(proxy_model_dir, "float32")
    got = score_templated(model, [sample], 4096, pad_id=tok.pad_token_id)
    cond, prior = reference_scores(model, sample)
    assert np.isfinite(got.ifd[0]) and 0 < got.ifd[0]
    np.testing.assert_allclose(got.loss_cond[0], cond, rtol=1e-4)
    np.testing.assert_allclose(got.loss_prior[0], prior, rtol=1e-4)
    np.testing.assert_allclose(got.ifd[0], np.exp(cond - prior), rtol=1e-4)
