"""Training examples and step arithmetic (pure: no Ray, no DeepSpeed).

A training example is the conditional text of scoring (docs/architecture.md section 2) with a loss mask:

    input_ids = [ prompt ........ | R r r r <eot> ]      (cut at sequence_len)
    labels    = [ -100 ... -100   | R r r r <eot> ]      final_response (default): the scored span
                [ -100 | A a <eot> | -100 | R r <eot> ]  all_assistant: every assistant turn

so the template's end-of-turn tokens are trained, as the scoring span scores them. HF causal LMs
shift labels inside the loss: label p is predicted from position p - 1, the same pairing as the
span NLL of scoring.
"""

from __future__ import annotations

import math

import numpy as np

from iterit.errors import RowError
from iterit.templates import render, response_start, template_batch

IGNORE = -100


def assistant_char_ranges(tok, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of every assistant turn in `text` (content + end-of-turn).

    Turn j ends where the template over messages[: j + 1] ends. Templates that rewrite earlier turns
    (so the shorter render is not a prefix of the full one) keep only the final response's range.
    """
    ranges = []
    for j, m in enumerate(messages[:-1]):
        if m["role"] != "assistant":
            continue
        prefix = render(tok, messages[: j + 1])
        if not text.startswith(prefix):
            ranges = []
            break
        ranges.append((response_start(tok, messages[: j + 1], prefix), len(prefix)))
    ranges.append((response_start(tok, messages, text), len(text)))
    return ranges


def training_examples(
    tok, conversations: list[list[dict]], max_length: int, train_on: str = "final_response"
) -> list[tuple[list[int], list[int]] | RowError]:
    """(input_ids, labels) per conversation, or the RowError of scoring (response_truncated)."""
    scored = template_batch(tok, conversations, max_length)
    out: list[tuple[list[int], list[int]] | RowError] = []
    for messages, t in zip(conversations, scored):
        if isinstance(t, RowError):
            out.append(t)
            continue
        ids = list(t.cond_ids)
        labels = [IGNORE] * t.cond_start + ids[t.cond_start :]
        if train_on == "all_assistant":
            text = render(tok, messages)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ranges = assistant_char_ranges(tok, messages, text)
            for p, (a, b) in enumerate(enc["offset_mapping"][: t.cond_start]):
                if any(a < end and b > start for start, end in ranges):
                    labels[p] = ids[p]
        out.append((ids, labels))
    return out


def collate(input_ids: list, labels: list, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a micro-batch: input_ids (pad_id), labels (-100), attention_mask."""
    n, t = len(input_ids), max(len(x) for x in input_ids)
    ids = np.full((n, t), pad_id, dtype=np.int64)
    lab = np.full((n, t), IGNORE, dtype=np.int64)
    mask = np.zeros((n, t), dtype=np.int64)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)] = x
        lab[i, : len(y)] = y
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def trained_tokens(labels: np.ndarray) -> int:
    """Tokens the loss covers (HF shifts: the first position is never a target)."""
    return int((labels[:, 1:] != IGNORE).sum())


def steps_per_iteration(k: int, workers: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of one epoch over k samples.

    Ray Train splits the dataset equally (up to workers - 1 samples are left out), each worker runs
    ceil(rows / micro) micro-batches, and a step closes every grad_accum micro-batches or at the
    end of the epoch (a shorter last step, as HF Trainer does)."""
    rows = k // workers
    return math.ceil(math.ceil(rows / micro_batch_size) / grad_accum) if rows else 0


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)  # as transformers.TrainingArguments.get_warmup_steps
