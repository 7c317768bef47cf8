"""Conversation -> token ids and the scored span, with the model's own chat template
(docs/architecture.md section 2).

For a conversation whose last turn is the response R:
    conditional text = chat template over the whole conversation (no generation prompt)
    prior text       = chat template over [assistant: R] alone
The span starts at R's first token in each text and runs to the end, so it includes the template's
end-of-turn tokens. Its length L comes from the conditional text cut at max_length; the prior span
uses the same L tokens. L = 0 is the reject `response_truncated`. A template that raises on a
conversation (roles that do not alternate, a system turn it refuses) makes that row the reject
`template_error`, with the template's own message; the rest of the batch is tokenised as usual.

    cond_ids  = [ prompt ........ | R r r r <eot> ]      cond_ids[cond_start : cond_start + L]
    prior_ids = [ (template head) | R r r r <eot> ]      prior_ids[prior_start : prior_start + L]
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass

from iterit.errors import IteritError, RowError

# Used when a tokenizer has no chat template of its own (and by `chat_template: chatml`).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Stands in for the response while locating where the template puts it (see response_start).
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

    from iterit.io import local_copy

    try:
        tok = AutoTokenizer.from_pretrained(local_copy(model), trust_remote_code=trust_remote_code)
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
    """None keeps the tokenizer's template (ChatML when it has none); 'chatml' or a Jinja string
    replaces it."""
    if chat_template == "chatml" or (chat_template is None and not getattr(tok, "chat_template", None)):
        tok.chat_template = CHATML_TEMPLATE
    elif chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token_id is None:  # batching needs one; it is never attended to
        tok.pad_token = tok.eos_token or tok.unk_token


def render(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def response_start(tok, messages: list[dict], text: str) -> int:
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


def template_message(e: Exception) -> str:
    """The detail of a template_error: the template's own message (`raise_exception('...')` raises
    jinja2's TemplateError with it); other exceptions from template code keep their type's name."""
    from jinja2.exceptions import TemplateError

    msg = str(e).strip()
    if isinstance(e, TemplateError) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# Appended to a template_error raised by the prior text: the conversation itself rendered, so the
# message alone ("roles must alternate") would point at the data instead of the template.
PRIOR_NOTE = " (in the prior text: the template over [assistant: response] alone)"


def _texts(tok, messages: list[dict]) -> tuple[str, int, str, int] | RowError:
    """(conditional text, response offset in it, prior text, response offset in it), or the row's
    RowError: template_error when the template raises, response_truncated when it drops the response."""
    note = ""
    try:
        cond = render(tok, messages)
        cond_at = response_start(tok, messages, cond)
        note = PRIOR_NOTE
        alone = [{"role": "assistant", "content": messages[-1]["content"]}]
        prior = render(tok, alone)
        return cond, cond_at, prior, response_start(tok, alone, prior)
    except RowError as e:
        return e
    except Exception as e:  # jinja2's TemplateError, and TypeError/KeyError/... raised by template code
        return RowError("template_error", template_message(e) + note)


def template_batch(tok, conversations: list[list[dict]], max_length: int) -> list[Templated | RowError]:
    """Template and tokenise a batch (the tokenizer runs once per batch, in Rust for fast tokenizers).

    A row the template cannot render is its RowError in the result; it never fails the batch."""
    texts = [_texts(tok, messages) for messages in conversations]
    out: list = [t if isinstance(t, RowError) else None for t in texts]  # the good rows are filled in below
    good = [(i, t) for i, t in enumerate(texts) if not isinstance(t, RowError)]
    if not good:
        return out
    fast = getattr(tok, "is_fast", False)
    enc_cond = tok([t[0] for _, t in good], add_special_tokens=False, return_offsets_mapping=fast)
    enc_prior = tok([t[2] for _, t in good], add_special_tokens=False, return_offsets_mapping=fast)
    for j, (i, (cond_text, cond_char, prior_text, prior_char)) in enumerate(good):
        cond_ids, prior_ids = enc_cond["input_ids"][j], enc_prior["input_ids"][j]
        cs = _token_start(tok, cond_text, cond_char, enc_cond["offset_mapping"][j] if fast else None)
        ps = _token_start(tok, prior_text, prior_char, enc_prior["offset_mapping"][j] if fast else None)
        span = min(min(max_length, len(cond_ids)) - cs, len(prior_ids) - ps)
        if span <= 0:
            out[i] = RowError(
                "response_truncated",
                f"the prompt fills {cs} of sequence_len={max_length} tokens; no response token is left",
            )
            continue
        out[i] = Templated(cond_ids[: cs + span], cs, prior_ids[: ps + span], ps, span)
    return out


def template_sample(tok, messages: list[dict], max_length: int) -> Templated:
    """One conversation; raises its RowError (response_truncated, template_error)."""
    (result,) = template_batch(tok, [messages], max_length)
    if isinstance(result, RowError):
        raise result
    return result


# --------------------------------------------------------------------------------------------
# A template that refuses the whole corpus: one line that names the cause and the fix.

OTHER_MESSAGES = "(other messages)"  # where a bounded failure count puts messages past its limit


def count_failure(failures: Counter[str], detail: str, limit: int = 100) -> None:
    """Count one template_error detail, keeping at most `limit` distinct messages (the sum stays exact)."""
    failures[detail if detail in failures or len(failures) < limit else OTHER_MESSAGES] += 1


def template_failures(rejects_path: str, limit: int = 100) -> Counter[str]:
    """template_error details of a rejects.jsonl -> count (at most `limit` distinct messages)."""
    import json

    from iterit.io import filesystem

    failures: Counter[str] = Counter()
    fs, p = filesystem(rejects_path)
    with fs.open(p, "r", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("reason") == "template_error":
                count_failure(failures, str(rec.get("detail", "")), limit)
    return failures


def check_template_failures(
    rows_read: int, scored: int, failures: Counter[str], system_prompt: str | None
) -> None:
    """Raise IteritError when nothing was scored and the chat template rejected most rows.

    `failures`: template_error detail -> rows. Some rows failing is not an error: they are rejects.
    A template that refuses any system turn while `system_prompt` is set fails on every row, since
    iterit puts the system prompt first in every conversation that has none."""
    failed = sum(failures.values())
    if scored or not failed or 2 * failed <= rows_read:
        return
    named = [(m, n) for m, n in failures.most_common() if m != OTHER_MESSAGES] or [(OTHER_MESSAGES, failed)]
    message, n = named[0]
    message = message.strip().splitlines()[0][:300] if message.strip() else "(no message)"
    rows = f"all {rows_read}" if failed == rows_read else f"{failed} of {rows_read}"
    others = f" ({n} of them; {failed - n} with other messages)" if failed > n else ""
    if system_prompt is not None and re.search(r"\bsystem\b", message, re.IGNORECASE):
        fix = (
            "iterit puts the configured system_prompt first in every conversation without a system "
            "turn: set `system_prompt: null` in the config"
        )
    else:
        fix = "fix the chat_template, or set `chat_template: chatml`"
    raise IteritError(
        f"no sample was scored: the chat template failed on {rows} rows with '{message}'{others}; {fix} "
        "(the template_error rejects in rejects.jsonl)"
    )
