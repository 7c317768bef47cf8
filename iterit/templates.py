"""Conversation -> token ids and the scored span, with the model's own chat template (DESIGN section 2).

For a conversation whose last turn is the response R:
    conditional text = chat template over the whole conversation (no generation prompt)
    prior text       = chat template over [assistant: R] alone
The span starts at R's first token in each text and runs to the end, so it includes the template's
end-of-turn tokens. Its length L comes from the conditional text cut at max_length; the prior span
uses the same L tokens. L = 0 is the reject `response_truncated`.

    cond_ids  = [ prompt ........ | R r r r <eot> ]      cond_ids[cond_start : cond_start + L]
    prior_ids = [ (template head) | R r r r <eot> ]      prior_ids[prior_start : prior_start + L]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from iterit.errors import IteritError, RowError

# Used when a tokenizer has no chat template of its own (and by `chat_template: chatml`).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Stands in for the response while locating where the template puts it (see _response_start).
_SENTINEL = "\u2063ITERIT_RESPONSE_SENTINEL\u2063"


@dataclass(frozen=True)
class Templated:
    """Token ids of one sample and its scored span. Lengths in tokens."""

    cond_ids: list[int]
    cond_start: int
    prior_ids: list[int]
    prior_start: int
    span_len: int

    @property
    def n_prompt_tokens(self) -> int:
        return self.cond_start

    @property
    def n_response_tokens(self) -> int:
        return self.span_len


def load_tokenizer(model: str, chat_template: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer with a chat template guaranteed: its own, the configured one, or ChatML."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise IteritError(
            f"cannot load a tokenizer from {model!r}: {str(e).splitlines()[0]} "
            "(give a local HF model folder, or a hub id on a machine that reaches the hub)"
        ) from None
    apply_template_choice(tok, chat_template)
    return tok


@functools.lru_cache(maxsize=4)
def cached_tokenizer(model: str, chat_template: str | None = None, trust_remote_code: bool = False):
    """load_tokenizer, once per process: Ray reuses worker processes for tasks, so templating and
    tokenising tasks load the tokenizer once per worker, not once per batch."""
    return load_tokenizer(model, chat_template, trust_remote_code)


def apply_template_choice(tok, chat_template: str | None) -> None:
    """None keeps the tokenizer's template (ChatML when it has none); 'chatml' or a Jinja string replaces it."""
    if chat_template == "chatml" or (chat_template is None and not getattr(tok, "chat_template", None)):
        tok.chat_template = CHATML_TEMPLATE
    elif chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token_id is None:  # batching needs one; it is never attended to
        tok.pad_token = tok.eos_token or tok.unk_token


def render(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def _response_start(tok, messages: list[dict], text: str) -> int:
    """Character offset in `text` where the response starts.

    The template is rendered once more with a sentinel in place of the response; everything before
    the sentinel is the prompt. This is the official `text.rfind(response)` in every ordinary case,
    without its failure when the response also occurs in the template's closing text (e.g. R = "end"
    inside "<|im_end|>"). Templates that rewrite the content (e.g. `| trim`) fall back to rfind.
    """
    response = messages[-1]["content"]
    probe = render(tok, messages[:-1] + [{"role": "assistant", "content": _SENTINEL}])
    cut = probe.find(_SENTINEL)
    if (
        cut >= 0
        and text.startswith(probe[:cut])
        and (text.startswith(response, cut) or text.startswith(response.strip(), cut))
    ):
        return cut
    for needle in (response, response.strip()):
        at = text.rfind(needle)
        if needle and at >= 0:
            return at
    raise RowError("response_truncated", "the chat template does not contain the response text")


def _token_start(tok, text: str, char_start: int, offsets: list[tuple[int, int]] | None) -> int:
    """Index of the first token that covers character `char_start` (a straddling token is included)."""
    if offsets is None:  # slow tokenizers: count the prompt's tokens, as the official code does
        return len(tok(text[:char_start], add_special_tokens=False)["input_ids"])
    for i, (_, end) in enumerate(offsets):
        if end > char_start:
            return i
    return len(offsets)


def template_batch(tok, conversations: list[list[dict]], max_length: int) -> list[Templated | RowError]:
    """Template and tokenise a batch (the tokenizer runs once per batch, in Rust for fast tokenizers)."""
    cond_texts, prior_texts, cond_chars, prior_chars = [], [], [], []
    for messages in conversations:
        cond = render(tok, messages)
        prior = render(tok, [{"role": "assistant", "content": messages[-1]["content"]}])
        cond_texts.append(cond)
        prior_texts.append(prior)
        cond_chars.append(_response_start(tok, messages, cond))
        prior_chars.append(
            _response_start(tok, [{"role": "assistant", "content": messages[-1]["content"]}], prior)
        )
    fast = getattr(tok, "is_fast", False)
    enc_cond = tok(cond_texts, add_special_tokens=False, return_offsets_mapping=fast)
    enc_prior = tok(prior_texts, add_special_tokens=False, return_offsets_mapping=fast)
    out: list[Templated | RowError] = []
    for i in range(len(conversations)):
        cond_ids, prior_ids = enc_cond["input_ids"][i], enc_prior["input_ids"][i]
        cs = _token_start(tok, cond_texts[i], cond_chars[i], enc_cond["offset_mapping"][i] if fast else None)
        ps = _token_start(
            tok, prior_texts[i], prior_chars[i], enc_prior["offset_mapping"][i] if fast else None
        )
        span = min(min(max_length, len(cond_ids)) - cs, len(prior_ids) - ps)
        if span <= 0:
            out.append(
                RowError(
                    "response_truncated",
                    f"the prompt fills {cs} of sequence_len={max_length} tokens; no response token is left",
                )
            )
            continue
        out.append(Templated(cond_ids[: cs + span], cs, prior_ids[: ps + span], ps, span))
    return out


def template_sample(tok, messages: list[dict], max_length: int) -> Templated:
    """One conversation; raises RowError('response_truncated') when no response token fits."""
    (result,) = template_batch(tok, [messages], max_length)
    if isinstance(result, RowError):
        raise result
    return result
