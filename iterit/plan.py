"""`iterit plan`: what a run will compute before it runs: tokens, FLOPs, GPU-hours and wall-clock per stage.

    corpus_stats(cfg, sample_rows)   N and the mean tokens of each pass, from a sample of the corpus
    plan_rows(cfg, stats, shape, ...)   one row per stage: tokens and FLOPs (pure arithmetic)
    format_plan(rows, ...)           the table

What each stage computes (docs/architecture.md section 1; I iterations, N samples,
k = selection.num_selected(N), W = selection.window(N)):
    scoring, iteration 0      N samples x two forward passes: the templated conversation (prompt +
                              response) and the response alone
    scoring, iterations 1..   W samples x the same two passes, with the previous iteration's model
                              (rows the template rejects are not counted: they never reach the model)
    training, each iteration  k samples x the conversation's tokens, forward and backward
    with a proxy (scoring.proxy_model, or --proxy-params): iteration 0's scoring is the proxy's two
                              passes over N (its FLOPs per token; the base model's token counts stand
                              in for its tokenizer's) + the base model's two passes over the window
                              W0 = Config.proxy_window(N); the rest is the same
    evaluation (--eval-samples M, as `iterit compare` evaluates each iteration's model): M held-out
                              conversations, one forward pass (`iterit run` itself evaluates nothing)
FLOPs per token (Kaplan et al. 2020, eq. 2.1, with causal attention: a token attends to s/2 tokens on
average): forward 2P + 2Lsd, for P parameters, L layers, hidden size d and a pass of s tokens a
sequence; training 3x the forward (6P + 6Lsd), 4x with gradient checkpointing (one more forward).
GPU time = FLOPs / (peak x MFU); wall-clock = GPU time / GPUs. Not FLOPs, so not here: model loads,
checkpoints and exports (docs/GPU.md estimates them), selection (CPU, seconds to minutes:
docs/measured.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from iterit.errors import IteritError

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), FLOP/s.
GPU_PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,  # SXM; PCIe 756e12
    "a100": 312e12,
    "l40s": 362e12,
    "a10g": 70e12,
    "l4": 121e12,
    "v100": 125e12,
}


@dataclass(frozen=True)
class CorpusStats:
    samples: int  # N: rows ingest accepts (k and W are shares of it)
    cond_tokens: float  # mean tokens of the templated conversation, truncated at sequence_len
    prior_tokens: float  # mean tokens of the response-alone pass
    measured: str  # where the figures come from, for the table
    scored_share: float = 1.0  # of the N, those the template leaves a response token (the rest: rejects)


@dataclass(frozen=True)
class StageRow:
    stage: str
    tokens: float
    flops: float
    memory: str = ""


def forward_flops_per_token(params: float, layers: int, hidden: int, seq: float) -> float:
    """2P + 2 L s d: the weights' multiply-adds and causal attention over s tokens."""
    return 2.0 * params + 2.0 * layers * seq * hidden


def plan_rows(
    iterations: int,
    n: int,
    k: int,
    w: int,
    stats: CorpusStats,
    params: float,
    layers: int,
    hidden: int,
    gradient_checkpointing: bool = False,
    training_memory: str = "",
    eval_samples: int = 0,
    proxy: tuple[float, int, int] | None = None,
    proxy_window: int = 0,
) -> list[StageRow]:
    """One StageRow per stage of the run (module docstring), in run order; `eval_samples` held-out
    conversations evaluated after each iteration (as `iterit compare` does: one forward pass each).
    `proxy` (parameters, layers, hidden; layers = hidden = 0 when only the parameters are known): the
    proxy path, whose iteration 0 scores N with the proxy and `proxy_window` samples with the base model."""
    cond, prior = stats.cond_tokens, stats.prior_tokens

    def scoring(samples: float, shape=(params, layers, hidden)) -> tuple[float, float]:
        tokens = samples * (cond + prior)
        flops = samples * (
            cond * forward_flops_per_token(*shape, cond) + prior * forward_flops_per_token(*shape, prior)
        )
        return tokens, flops

    train_factor = 4.0 if gradient_checkpointing else 3.0
    train_tokens = k * cond
    train_flops = train_factor * train_tokens * forward_flops_per_token(params, layers, hidden, cond)
    # Rows the template rejects (response_truncated, template_error) never reach the model. A later
    # window is the k picks, then the samples without a score (those rejects among them), then
    # candidates: it re-scores the picks and what of W is left past the rejects.
    rejects = n * (1 - stats.scored_share)
    scored_of = [n * stats.scored_share] + [min(w, k + max(0.0, w - k - rejects))] * (iterations - 1)
    rows = []
    for e, samples in enumerate(scored_of):
        if e == 0 and proxy:  # the window is the proxy's best candidates: all scored, none rejected
            tokens, flops = scoring(samples, proxy)
            rows.append(StageRow(f"iter 0 proxy scoring ({round(samples):,} x 2 passes)", tokens, flops))
            samples = min(proxy_window, samples)
            tokens, flops = scoring(samples)
            rows.append(StageRow(f"iter 0 window scoring ({round(samples):,} x 2 passes)", tokens, flops))
        else:
            tokens, flops = scoring(samples)
            rows.append(StageRow(f"iter {e} scoring ({round(samples):,} samples x 2 passes)", tokens, flops))
        rows.append(
            StageRow(f"iter {e} training ({k:,} samples)", train_tokens, train_flops, training_memory)
        )
        if eval_samples:
            flops = eval_samples * cond * forward_flops_per_token(params, layers, hidden, cond)
            rows.append(
                StageRow(f"iter {e} evaluation ({eval_samples:,} held out)", eval_samples * cond, flops)
            )
    return rows


def corpus_stats(cfg, sample_rows: int = 1000, log=print) -> CorpusStats:
    """N and the mean tokens of each pass: the first `sample_rows` usable rows of every dataset entry
    templated with the model's tokenizer; N counted exactly where a file says it (Parquet footers, an
    HF dataset's row count), else extrapolated from the bytes read (JSON, JSONL, compressed files)."""
    from iterit.data import HFSource, normalise, read_hf_records, read_records, sources
    from iterit.templates import load_tokenizer, template_batch

    tok = load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)
    total, estimated, convs = 0.0, False, []
    for ds in cfg.datasets:
        for src in sources(ds):
            rows = read_hf_records(src) if isinstance(src, HFSource) else read_records(src)
            read, taken = 0, []
            for _, rec in itertools.islice(rows, sample_rows):
                read += 1
                try:
                    taken.append(normalise(rec, ds, cfg.system_prompt))
                except Exception:  # noqa: BLE001 - a reject at ingest: not counted here either
                    continue
            convs += taken
            count, exact = _row_count(src, read, sample_rows)
            count = count if ds.max_samples is None else min(count, ds.max_samples)
            total += count * len(taken) / max(1, read)  # the sample's share of accepted rows
            estimated |= not exact or len(taken) < read < count
    if not convs:
        raise IteritError(
            "plan: no usable rows in the first rows of any dataset; run `iterit ingest` to see why"
        )
    done = [t for t in template_batch(tok, convs, cfg.sequence_len) if not isinstance(t, Exception)]
    if not done:
        raise IteritError(
            "plan: the chat template rejects every sampled row; run `iterit ingest` then `score`"
        )
    cond = sum(len(t.cond_ids) for t in done) / len(done)
    prior = sum(len(t.prior_ids) for t in done) / len(done)
    how = (
        f"measured on {len(convs):,} sampled rows ({len(done) / len(convs):.0%} fit sequence_len "
        f"{cfg.sequence_len}: the rest are scoring rejects); N {'extrapolated' if estimated else 'counted'}"
    )
    return CorpusStats(round(total), cond, prior, how, len(done) / len(convs))


def _row_count(src, read: int, sample_rows: int) -> tuple[int, bool]:
    """(rows of one source, exact?): everything read when under sample_rows; else the file's own count
    where it keeps one, else its size over the bytes per row of the first rows."""
    from iterit.data import HFSource, open_hf
    from iterit.io import filesystem

    if read < sample_rows:
        return read, True
    if isinstance(src, HFSource):
        data, _ = open_hf(src)
        n = getattr(data, "num_rows", None)
        return (int(n), True) if n is not None else (read, False)
    fs, p = filesystem(src)
    if p.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(p, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows, True
    size = fs.size(p)
    with fs.open(p, "rb", compression="infer") as f:
        head = f.read(8 << 20)
    lines = head.count(b"\n")
    if lines == 0:
        return read, False
    per_row = len(head) / lines
    return max(read, int(size / per_row)), False


def format_plan(
    rows: list[StageRow],
    peak_flops: float,
    device: str,
    gpus: int,
    mfu: float,
    given: list[str],
) -> str:
    """The table: per stage tokens, FLOPs, device-hours and wall-clock at `mfu` of `peak_flops` on `gpus`."""
    rate = peak_flops * mfu
    head = f"{'stage':<46} {'tokens':>10} {'FLOPs':>9} {device + '-hours':>12} {'wall-clock':>11}  memory"
    lines = [head, "-" * len(head)]
    total_tokens = total_flops = 0.0
    for r in rows:
        hours = r.flops / rate / 3600
        clock = _clock(hours / gpus)
        lines.append(
            f"{r.stage:<46} {r.tokens:>10.3g} {r.flops:>9.2e} {hours:>12.3g} {clock:>11}  {r.memory}"
        )
        total_tokens, total_flops = total_tokens + r.tokens, total_flops + r.flops
    hours = total_flops / rate / 3600
    lines.append(
        f"{'total':<46} {total_tokens:>10.3g} {total_flops:>9.2e} {hours:>12.3g} {_clock(hours / gpus):>11}"
    )
    lines.append(
        f"at {mfu:.0%} of {peak_flops / 1e12:,.4g} TFLOP/s ({device}) on {gpus} device(s); "
        + "; ".join(given)
        + ". Not counted: model loads, checkpoints, exports, selection (docs/GPU.md)."
    )
    return "\n".join(lines)


def format_saving(
    full: list[StageRow], proxy: list[StageRow], peak_flops: float, mfu: float, device: str
) -> str:
    """The proxy path's saving against the full path: GPU-hours of the whole run and of its scoring."""
    rate = peak_flops * mfu * 3600

    def hours(rows, scoring_only=False):
        return sum(r.flops for r in rows if not scoring_only or "scoring" in r.stage) / rate

    a, b = hours(full), hours(proxy)
    sa, sb = hours(full, True), hours(proxy, True)
    return (
        f"proxy path: {b:,.3g} {device}-hours against the full path's {a:,.3g}, {a - b:,.3g} saved "
        f"({b / a:.0%} of the full path); scoring alone {sb:,.3g} against {sa:,.3g} ({sb / sa:.0%}).\n"
        "Every selection is still made on the base model's scores of a window: check the picks with "
        "`iterit compare --methods iterit,iterit+proxy` (docs/scoring.md#proxy)."
    )


def _clock(hours: float) -> str:
    s = hours * 3600
    if s < 90:
        return f"{s:.2g} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{hours:.1f} h"
