"""Span losses, IFD and response embeddings for padded batches (pure torch: no Ray).

For each templated sample (see iterit.templates) two sequences are scored:
    conditional: [prompt | response span]   -> loss_cond  = mean NLL of the span tokens
    prior:       [head   | response span]   -> loss_prior = mean NLL of the same tokens
    ifd = exp(loss_cond - loss_prior)       (perplexity given the instruction / perplexity alone)
    embedding = L2-normalised mean of the last hidden state over the prior pass's span
                (optionally randomly projected to fewer dimensions and normalised again: project_embeddings)

Only span rows ever reach the output head: the model body runs over the padded batch, the hidden
states that predict span tokens are gathered, and the head + fp32 log-softmax run on those rows,
in chunks. Full-vocabulary logits for every position are never materialised.

All sequences of a batch (both passes of every sample) are pooled, sorted by length and cut into
micro-batches under a token budget (count x longest <= budget), so padding stays small; results
are scattered back to their samples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from iterit.templates import Templated

LOGIT_CHUNK_ELEMENTS = 1 << 25  # rows x vocab per head chunk: 128 MB of fp32 logits at most


@dataclass
class Scores:
    """Per-sample results of one batch, in input order (float64 losses; NaN where not scored)."""

    loss_cond: np.ndarray  # (N,)
    loss_prior: np.ndarray  # (N,)
    embedding: np.ndarray | None  # (N, H) float32, rows of norm 1
    computed_tokens: int  # batch slots the model ran over, padding included
    real_tokens: int  # of which real tokens
    oom_splits: int = 0  # micro-batches halved after a CUDA out-of-memory (token_budget is too large)

    @property
    def ifd(self) -> np.ndarray:
        return np.exp(self.loss_cond - self.loss_prior)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / max(1, self.computed_tokens)


def plan_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped so that count x longest <= token_budget, longest sequences first.

    Sorting by length keeps neighbours alike, so padding is small; a sequence longer than the
    budget runs alone. Longest first: an out-of-memory error shows on the first micro-batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _body_and_head(model):
    """(decoder body returning hidden states, output head) of a HF causal LM."""
    return model.base_model, model.get_output_embeddings()


def span_nll_and_hidden(
    model, seqs: list[list[int]], starts: list[int], lengths: list[int], pad_id: int, want_hidden: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch -> (mean span NLL per sequence (B,) fp64, mean last hidden state over the span
    (B, H) fp32 when want_hidden). Sequences are right-padded with pad_id.

    Span token p (start <= p < start + L) is predicted by the hidden state at p - 1, so a span that
    starts at position 0 loses its first token (as HF's shifted loss does).
    """
    body, head = _body_and_head(model)
    device = next(model.parameters()).device
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)

    # Gather the rows that predict span tokens: (b, p - 1) -> target ids[b, p].
    b_idx, tgt_pos = [], []
    for b, (st, ln) in enumerate(zip(starts, lengths)):
        first = max(st, 1)
        b_idx.extend([b] * max(0, st + ln - first))
        tgt_pos.extend(range(first, st + ln))
    b_idx_t = torch.tensor(b_idx, dtype=torch.long, device=device)
    tgt_pos_t = torch.tensor(tgt_pos, dtype=torch.long, device=device)
    rows = hidden[b_idx_t, tgt_pos_t - 1]  # (N_span, H)
    targets = ids[b_idx_t, tgt_pos_t]  # (N_span,)

    nll = torch.empty(len(b_idx), dtype=torch.float32, device=device)
    vocab = head.weight.shape[0]
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    cap = getattr(model.config, "final_logit_softcapping", None)
    for i in range(0, len(b_idx), chunk):
        logits = head(rows[i : i + chunk]).float()  # (chunk, V), fp32 log-softmax
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits, dim=-1)
        nll[i : i + chunk] = -logp.gather(1, targets[i : i + chunk, None])[:, 0]
    sums = torch.zeros(B, dtype=torch.float64, device=device).index_add_(0, b_idx_t, nll.double())
    counts = torch.zeros(B, dtype=torch.float64, device=device).index_add_(
        0, b_idx_t, torch.ones_like(nll, dtype=torch.float64)
    )
    mean_nll = sums / counts  # NaN for a sequence with nothing to predict

    pooled = None
    if want_hidden:
        # Mean over the span tokens themselves, in fp32.
        span_mask = torch.zeros((B, T), dtype=torch.float32, device=device)
        for b, (st, ln) in enumerate(zip(starts, lengths)):
            span_mask[b, st : st + ln] = 1.0
        pooled = (hidden.float() * span_mask[..., None]).sum(1) / span_mask.sum(1, keepdim=True).clamp_min(1)
    return mean_nll, pooled


def score_templated(
    model,
    samples: list[Templated],
    token_budget: int,
    pad_id: int,
    embeddings: bool = True,
    prior: bool = True,
) -> Scores:
    """Both passes of every sample, micro-batched under `token_budget`. Inference only.

    `prior=False` runs the conditional pass only (held-out loss needs nothing else): loss_prior is
    NaN and there are no embeddings, for about half the work.
    On CUDA out-of-memory a micro-batch is split in two and retried, down to one sequence.
    """
    n = len(samples)
    embeddings = embeddings and prior  # the embedding pools the prior pass's span
    seqs, starts, lens, owner, is_prior = [], [], [], [], []
    for i, t in enumerate(samples):
        passes = ((t.cond_ids, t.cond_start, False), (t.prior_ids, t.prior_start, True))[: 2 if prior else 1]
        for ids, start, is_p in passes:
            seqs.append(ids)
            starts.append(start)
            lens.append(t.span_len)
            owner.append(i)
            is_prior.append(is_p)
    loss = np.full((2, n), np.nan)
    emb = None
    computed = real = splits = 0
    pending = plan_micro_batches([len(s) for s in seqs], token_budget)
    with torch.inference_mode():
        while pending:
            mb = pending.pop(0)
            want_hidden = embeddings and any(is_prior[j] for j in mb)
            try:
                mean_nll, pooled = span_nll_and_hidden(
                    model,
                    [seqs[j] for j in mb],
                    [starts[j] for j in mb],
                    [lens[j] for j in mb],
                    pad_id,
                    want_hidden,
                )
            except torch.cuda.OutOfMemoryError:
                if len(mb) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(mb) // 2
                pending[:0] = [mb[:half], mb[half:]]
                splits += 1
                continue
            computed += len(mb) * max(len(seqs[j]) for j in mb)
            real += sum(len(seqs[j]) for j in mb)
            mean_nll = mean_nll.cpu().numpy()
            for k, j in enumerate(mb):
                loss[int(is_prior[j]), owner[j]] = mean_nll[k]
            if pooled is not None:
                pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
                if emb is None:
                    emb = np.zeros((n, pooled.shape[1]), dtype=np.float32)
                for k, j in enumerate(mb):
                    if is_prior[j]:
                        emb[owner[j]] = pooled[k]
    return Scores(loss[0], loss[1], emb, computed, real, splits)


EMBEDDING_SEED = 0  # the projection's seed: fixed, so every actor of every run builds the same matrix


@functools.lru_cache(maxsize=4)
def projection_matrix(hidden: int, dim: int, seed: int = EMBEDDING_SEED) -> np.ndarray:
    """The (hidden, dim) float32 random projection, entries N(0, 1/dim); built once per (hidden, dim)
    in a process, read-only.

    Its normals come from the raw 64-bit words of np.random.default_rng([seed, hidden, dim])'s PCG64
    through Box-Muller in float64: numpy keeps a bit generator's stream fixed across versions but not
    Generator.standard_normal's algorithm, so the matrix depends on (seed, hidden, dim) alone, not on
    the numpy of the actor that builds it (up to the last bit of float64 log/cos, which float32
    rounding hides).
    """
    size = hidden * dim
    raw = np.random.default_rng([seed, hidden, dim]).bit_generator.random_raw(2 * ((size + 1) // 2))
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # uniform in (0, 1), never 0
    r, theta = np.sqrt(-2.0 * np.log(u[0::2])), 2.0 * np.pi * u[1::2]
    z = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)[:size]  # N(0, 1)
    m = (z / np.sqrt(dim)).astype(np.float32).reshape(hidden, dim)
    m.setflags(write=False)
    return m


def project_embeddings(emb: np.ndarray, dim: int | None, seed: int = EMBEDDING_SEED) -> np.ndarray:
    """(n, h) float32 embeddings -> (n, dim) float32 rows of norm 1: emb @ projection_matrix(h, dim),
    each row divided by its norm (a zero row, a sample without an embedding, stays zero).

    dim None: `emb` itself, untouched (score_templated's rows are unit vectors already). Projecting
    unit or unnormalised rows gives the same result: normalising is the last step.
    """
    emb = np.asarray(emb, dtype=np.float32)
    if dim is None:
        return emb
    out = emb @ projection_matrix(emb.shape[1], dim, seed)  # (n, dim)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def reference_scores(model, sample: Templated) -> tuple[float, float]:
    """The straightforward per-sample computation (batch size 1, full logits, HF-style shift):
    the yardstick score_templated is tested and benchmarked against."""
    out = []
    with torch.inference_mode():
        for ids, st in ((sample.cond_ids, sample.cond_start), (sample.prior_ids, sample.prior_start)):
            x = torch.tensor([ids], device=next(model.parameters()).device)
            logits = model(input_ids=x).logits[0].float()  # (T, V)
            labels = x[0].clone()
            labels[:st] = -100
            labels[st + sample.span_len :] = -100
            nll = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
            out.append(float(nll))
    return out[0], out[1]
