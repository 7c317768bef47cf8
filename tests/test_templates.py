"""Spans of docs/architecture.md section 2, checked token by token on the demo model's real chat template (SmolLM2)
and on the ChatML fallback of a locally trained tokenizer."""

import pytest

from iterit.config import DatasetConfig
from iterit.data import normalise
from iterit.errors import RowError
from iterit.templates import CHATML_TEMPLATE, apply_template_choice, template_batch, template_sample

SYS = {"role": "system", "content": "You are a helpful assistant."}


def tokens(tok, ids):
    return [tok.decode([i]) for i in ids]


def check_invariants(t):
    """The span is the same L tokens in both texts and runs to the end of each."""
    assert t.cond_ids[t.cond_start :] == t.prior_ids[t.prior_start :]
    assert len(t.cond_ids) == t.cond_start + t.span_len and len(t.prior_ids) == t.prior_start + t.span_len


# ---- SmolLM2-135M-Instruct, hand-checked against its tokenizer


def test_smollm_single_turn_hand_checked(smollm_tokenizer):
    tok = smollm_tokenizer
    t = template_sample(
        tok,
        [SYS, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        2048,
    )
    # <|im_start|> system \n You are a helpful assistant . <|im_end|> \n   (0..10)
    # <|im_start|> user \n Name a colour . <|im_end|> \n                   (11..19)
    # <|im_start|> ass istant \n | Blue . <|im_end|> \n                    (20..27)
    assert (t.cond_start, t.span_len, len(t.cond_ids)) == (24, 4, 28)
    assert t.cond_ids[24:] == [23390, 30, 2, 198]
    assert tokens(tok, t.cond_ids[20:24]) == ["<|im_start|>", "ass", "istant", "\n"]
    # The prior text is the template over [assistant: R] alone: SmolLM2's template then adds its own
    # default system turn (21 tokens), so the response starts at 25.
    assert t.prior_start == 25
    assert tok.decode(t.prior_ids[: t.prior_start]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    assert tokens(tok, t.prior_ids[t.prior_start :]) == ["Blue", ".", "<|im_end|>", "\n"]
    assert (t.n_prompt_tokens, t.n_response_tokens) == (24, 4)
    check_invariants(t)


def test_smollm_with_input_multi_turn_and_truncation(smollm_tokenizer):
    tok = smollm_tokenizer
    alpaca = normalise(
        {"instruction": "Translate.", "input": "chat", "output": "cat"}, DatasetConfig(path="x")
    )
    t = template_sample(tok, alpaca, 2048)
    assert (t.cond_start, t.span_len) == (27, 3)
    assert tok.decode(t.cond_ids[: t.cond_start]).endswith(
        "<|im_start|>user\nTranslate.\nInput: chat<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokens(tok, t.cond_ids[t.cond_start :]) == ["cat", "<|im_end|>", "\n"]

    multi = [
        SYS,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
    ]
    t = template_sample(tok, multi, 2048)
    assert (t.cond_start, t.span_len, t.prior_start) == (41, 3, 25)
    assert "Hello!" in tok.decode(t.cond_ids[: t.cond_start])  # earlier turns are context, never scored
    assert tokens(tok, t.cond_ids[t.cond_start :]) == ["5", "<|im_end|>", "\n"]

    single = [SYS, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    cut = template_sample(tok, single, 26)  # max_length cuts the end-of-turn tokens off
    assert (cut.cond_start, cut.span_len) == (24, 2)
    assert tokens(tok, cut.cond_ids[24:]) == ["Blue", "."] and tokens(tok, cut.prior_ids[25:]) == [
        "Blue",
        ".",
    ]
    check_invariants(cut)
    with pytest.raises(RowError) as e:
        template_sample(tok, single, 24)
    assert e.value.reason == "response_truncated" and "24 of sequence_len=24" in e.value.detail


def test_response_inside_the_template_closing_text(smollm_tokenizer):
    """R = 'end' also occurs in '<|im_end|>': the span must still start at the real response."""
    tok = smollm_tokenizer
    t = template_sample(
        tok, [SYS, {"role": "user", "content": "Say end"}, {"role": "assistant", "content": "end"}], 100
    )
    assert tok.decode(t.cond_ids[t.cond_start :]) == "end<|im_end|>\n"
    check_invariants(t)


# ---- ChatML fallback on the tiny locally trained tokenizer


def test_chatml_fallback_spans(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.chat_template == CHATML_TEMPLATE
    convs = [
        [
            SYS,
            {"role": "user", "content": "Why is the sum two?"},
            {"role": "assistant", "content": "Because one and one."},
        ],
        [
            SYS,
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Write code."},
            {"role": "assistant", "content": "print(1)"},
        ],
    ]
    for conv, t in zip(convs, template_batch(tok, convs, 512)):
        text = tok.decode(t.cond_ids)
        assert tok.decode(t.cond_ids[t.cond_start :]) == conv[-1]["content"] + "<|im_end|>\n"
        assert tok.decode(t.cond_ids[: t.cond_start]).endswith("<|im_start|>assistant\n")
        # ChatML adds no default system turn: the prior text is exactly the assistant turn.
        assert tok.decode(t.prior_ids) == "<|im_start|>assistant\n" + conv[-1]["content"] + "<|im_end|>\n"
        assert text.count("<|im_start|>") == len(conv)
        check_invariants(t)
    short = template_batch(tok, convs, 8)
    assert all(isinstance(r, RowError) and r.reason == "response_truncated" for r in short)


def test_tokenizer_without_template_gets_chatml_and_explicit_choice_wins(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    apply_template_choice(tok, None)
    assert tok.chat_template == CHATML_TEMPLATE
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    apply_template_choice(tok, custom)
    t = template_sample(
        tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the answer"}], 64
    )
    # The template puts a space before the content, and byte-level BPE merges it into " the": a token
    # that straddles the response start belongs to the span (its first word is never dropped).
    assert tok.decode(t.cond_ids[t.cond_start :]) == " the answer\n"
    check_invariants(t)
