"""The GPU check: scoring and training throughput, MFU and exactness on one GPU, from model configs alone.

    python benchmarks/bench_gpu.py                  # one H100/H200: Llama-3.2-1B and -3-8B shapes, < 8 min
    python benchmarks/bench_gpu.py --smoke          # the same code path on CPU with tiny shapes, < 60 s
    python benchmarks/bench_gpu.py --out gpu.jsonl  # also write the JSON lines to a file

Needs torch, transformers and numpy, and this checkout as it is: the script puts the checkout on
sys.path, so nothing is installed; no Ray, no DeepSpeed, no download (the models are random-initialised
from their configs, which does not change their speed). Measures, one JSON line each, then a table:

  gemm   the matmul rate of an 8192^3 product in bf16 and fp32 (--smoke: 512^3): the MFU reference
         measured in the same run, beside the datasheet's dense peak where the GPU is known
  score  iterit.scoring.losses.score_templated (span-only head, token-budget micro-batches, both
         passes, embeddings) in bf16 on both shapes and in fp32 on the 1B shape: tokens/s, model
         FLOPs per token (2 x body parameters + causal attention + the head on span rows), MFU against
         the measured GEMM rate and against the datasheet peak, padding
  exact  on the 1B shape: the batched scorer against the per-sample reference (batch of one, full
         logits) on 32 sequences in fp32, IFD within 1e-4 relative; bf16 against fp32 on the fp32
         throughput samples: Spearman of IFD, overlap of the top-5% sets
  oom    a token budget that does not fit (GPU: torch.cuda.set_per_process_memory_fraction leaves the
         allocator 2 GiB above the model; CPU: a simulated out-of-memory above a token count), the
         micro-batches halved until they fit, the halvings counted, the scores against a budget that fits
  train  optimizer steps of the 1B shape in bf16 (AdamW, the loss mask of iterit.training.examples:
         prompt tokens -100), without and with activation checkpointing (non-reentrant): tokens/s,
         MFU (6 x parameters per token), peak GPU memory

Lengths follow the demo's ShareGPT conversations (SmolLM2 tokens, quantiles kept below); the weights
are random, so the exactness figures check numerics, not a trained model's ranking.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the checkout's iterit, and bench_scoring beside this file

from bench_scoring import spearman, useful_flops  # noqa: E402

from iterit.scoring import losses  # noqa: E402
from iterit.scoring.losses import reference_scores, score_templated  # noqa: E402
from iterit.templates import Templated  # noqa: E402
from iterit.training.examples import IGNORE, collate  # noqa: E402

# Token lengths of the demo's ShareGPT conversations whose response fits 4,096 tokens (2,000 of them,
# SmolLM2 tokenizer, ChatML with the default system prompt): percentiles of the prompt (every turn
# before the final response) and of the final response. The prior pass's head is 25 tokens.
PERCENTILES = [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100]
PROMPT_TOKENS = [15, 31, 49, 301, 629, 1014, 1414, 1682, 1839, 1961, 2070, 2161, 2579, 4024]
RESPONSE_TOKENS = [4, 31, 77, 168, 233, 282, 332, 383, 463, 576, 742, 850, 975, 1187]
PRIOR_HEAD_TOKENS = 25

LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, initializer_range=0.02)
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
# --smoke: the same two kinds of shape (tied and untied head, 128K vocabulary) at toy width and depth.
SMOKE_SHAPES = {
    "llama-3.2-1b": {
        **SHAPES["llama-3.2-1b"],
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "llama-3-8b": {
        **SHAPES["llama-3-8b"],
        "hidden_size": 128,
        "intermediate_size": 448,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}

# Dense tensor-core bf16 and fp32 (no TF32) peaks in TFLOP/s from NVIDIA's datasheets, by device name.
DATASHEET_TFLOPS = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
]

# What each run does: sample counts, the longest sequence, the token budget, the GEMM size.
GPU_PLAN = dict(
    n_bf16=512,
    n_bf16_8b=256,
    n_fp32=64,
    max_len=2048,
    scale=1.0,
    budget=32768,
    gemm=8192,
    exact_n=32,
    exact_scale=0.25,
    oom_n=32,
    train_batch=8,
    train_dtype="bfloat16",
    train_steps=3,
)
SMOKE_PLAN = dict(
    n_bf16=16,
    n_bf16_8b=8,
    n_fp32=16,
    max_len=256,
    scale=0.125,
    budget=2048,
    gemm=512,
    exact_n=32,
    exact_scale=0.03,
    oom_n=8,
    train_batch=2,
    train_dtype="float32",  # CPUs without native bf16 GEMMs take minutes for a bf16 backward pass
    train_steps=2,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def emit(record: dict, out) -> dict:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()
    return record


def synthetic_samples(n: int, max_len: int, scale: float, vocab: int, seed: int) -> list[Templated]:
    """n conversations with demo-like prompt and response lengths (times `scale`), prompt + response
    <= max_len (longer draws are drawn again, as sequence_len rejects them), random token ids."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        p = max(1, round(scale * np.interp(rng.uniform(0, 100), PERCENTILES, PROMPT_TOKENS)))
        r = max(2, round(scale * np.interp(rng.uniform(0, 100), PERCENTILES, RESPONSE_TOKENS)))
        if p + r > max_len:
            continue
        head = max(1, round(scale * PRIOR_HEAD_TOKENS))
        prompt, response, head_ids = (rng.integers(1000, vocab, size=k).tolist() for k in (p, r, head))
        out.append(Templated(prompt + response, p, head_ids + response, head, r))
    return out


def build_model(shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**LLAMA3, **shape), dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()


def gemm_tflops(n: int, dtype: torch.dtype, device: str, seconds: float) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        if device == "cuda" and count % 10 == 0:
            sync(device)
    sync(device)
    return count * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def datasheet(device: str) -> tuple[str, float | None, float | None]:
    if device != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name()
    for key, bf16, fp32 in DATASHEET_TFLOPS:
        if key in name:
            return name, bf16, fp32
    return name, None, None


def scoring_flops(model, samples: list[Templated]) -> float:
    """Forward FLOPs of both passes: bench_scoring's parameter FLOPs (body on every token, the head on
    span rows) plus causal attention, 2 x layers x hidden x T^2 per sequence (QK^T and AV, half square)."""
    c = model.config
    attention = sum(
        2.0 * c.num_hidden_layers * c.hidden_size * len(s) ** 2
        for t in samples
        for s in (t.cond_ids, t.prior_ids)
    )
    return useful_flops(model, samples) + attention


def measure_scoring(model, samples, budget, device, rates, label: dict, out) -> tuple[dict, np.ndarray]:
    score_templated(model, samples[:2], budget, pad_id=0)  # warm-up: kernels, allocator
    sync(device)
    t0 = time.perf_counter()
    s = score_templated(model, samples, budget, pad_id=0)
    sync(device)
    sec = time.perf_counter() - t0
    flops = scoring_flops(model, samples)
    dtype = label["dtype"]
    rec = emit(
        {
            "measure": "score",
            **label,
            "samples": len(samples),
            "tokens": s.real_tokens,
            "seconds": round(sec, 3),
            "tokens_per_s": round(s.real_tokens / sec, 1),
            "samples_per_s": round(len(samples) / sec, 2),
            "model_gflop_per_token": round(flops / s.real_tokens / 1e9, 3),
            "achieved_tflops": round(flops / sec / 1e12, 3),
            "mfu_measured_gemm": round(flops / sec / 1e12 / rates[dtype], 4),
            "mfu_datasheet": round(flops / sec / 1e12 / rates[f"{dtype}_peak"], 4)
            if rates[f"{dtype}_peak"]
            else None,
            "padding": round(s.padding_fraction, 4),
            "oom_splits": s.oom_splits,
        },
        out,
    )
    return rec, s.ifd


def measure_exactness(model, plan, device, out) -> dict:
    """fp32: the batched scorer against the per-sample reference on exact_n short sequences."""
    samples = synthetic_samples(
        plan["exact_n"], plan["max_len"], plan["exact_scale"], model.config.vocab_size, seed=1
    )
    ref = np.array([reference_scores(model, t) for t in samples])
    got = score_templated(model, samples, plan["budget"], pad_id=0)
    ifd_ref = np.exp(ref[:, 0] - ref[:, 1])
    rel = float(np.max(np.abs(got.ifd - ifd_ref) / ifd_ref))
    return emit(
        {
            "measure": "exact",
            "shape": "llama-3.2-1b",
            "dtype": "float32",
            "samples": len(samples),
            "max_relative_ifd_difference": rel,
            "tolerance": 1e-4,
            "ok": rel <= 1e-4,
            "ifd_spread_iqr": [round(float(q), 5) for q in np.percentile(ifd_ref, [25, 75])],
        },
        out,
    )


def measure_oom(model, plan, device, out) -> dict:
    """A budget that holds every sequence in one micro-batch, where memory holds far fewer: the scorer
    halves until micro-batches fit; scores equal those of a budget that fits."""
    samples = synthetic_samples(
        plan["oom_n"], plan["max_len"], plan["scale"], model.config.vocab_size, seed=2
    )
    huge = 2 * len(samples) * plan["max_len"]
    want = score_templated(model, samples, plan["budget"], pad_id=0)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        cap = torch.cuda.memory_allocated() + 2 * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        try:
            got = score_templated(model, samples, huge, pad_id=0)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        how = "allocator capped 2 GiB above the model"
    else:  # no CUDA allocator to exhaust: the same except branch, raised above a token count
        limit, real = plan["budget"] // 2, losses.span_nll_and_hidden

        def tight(m, seqs, *a, **k):
            if len(seqs) * max(len(s) for s in seqs) > limit:
                raise torch.cuda.OutOfMemoryError(f"simulated: more than {limit} tokens")
            return real(m, seqs, *a, **k)

        losses.span_nll_and_hidden = tight
        try:
            got = score_templated(model, samples, huge, pad_id=0)
        finally:
            losses.span_nll_and_hidden = real
        how = f"simulated above {limit} tokens"
    rel = float(np.nanmax(np.abs(got.ifd - want.ifd) / want.ifd))
    return emit(
        {
            "measure": "oom",
            "shape": "llama-3.2-1b",
            "dtype": str(next(model.parameters()).dtype).split(".")[-1],
            "how": how,
            "token_budget": huge,
            "halvings": got.oom_splits,
            "all_scored": bool(np.isfinite(got.ifd).all()),
            "max_relative_ifd_difference_vs_fitting_budget": rel,
        },
        out,
    )


def measure_training(model, plan, device, rates, checkpointing: bool, out, reference=None) -> dict:
    """train_steps optimizer steps (after one warm-up) on micro-batches of train_batch sequences.
    `reference`: the losses of a run from the same weights without checkpointing, to compare with."""
    model.train()
    model.config.use_cache = False
    if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable; the GPU machine's may be older
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    params = sum(p.numel() for p in model.parameters())
    batches = []
    for step in range(plan["train_steps"] + 1):
        seqs = synthetic_samples(
            plan["train_batch"], plan["max_len"], plan["scale"], model.config.vocab_size, 10 + step
        )
        labels = [[IGNORE] * t.cond_start + t.cond_ids[t.cond_start :] for t in seqs]
        b = collate([t.cond_ids for t in seqs], labels, pad_id=0)
        batches.append({k: torch.from_numpy(v).to(device) for k, v in b.items()})
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, losses_seen = 0, []
    for i, batch in enumerate(batches):
        if i == 1:  # after the warm-up step
            sync(device)
            t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses_seen.append(loss.item())
        if i >= 1:
            tokens += int(batch["attention_mask"].sum())
    sync(device)
    sec = time.perf_counter() - t0
    if checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    del opt
    model.eval()
    flops = 6.0 * params * tokens
    return emit(
        {
            "measure": "train",
            "shape": "llama-3.2-1b",
            "dtype": plan["train_dtype"],
            "activation_checkpointing": checkpointing,
            "micro_batch": plan["train_batch"],
            "steps": plan["train_steps"],
            "tokens": tokens,
            "seconds": round(sec, 3),
            "tokens_per_s": round(tokens / sec, 1),
            "mfu_measured_gemm": round(flops / sec / 1e12 / rates[plan["train_dtype"]], 4),
            "mfu_datasheet": round(flops / sec / 1e12 / rates[f"{plan['train_dtype']}_peak"], 4)
            if rates[f"{plan['train_dtype']}_peak"]
            else None,
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if device == "cuda"
            else None,
            "losses": [round(x, 4) for x in losses_seen],
            "max_loss_difference_vs_off": max(abs(a - b) for a, b in zip(reference, losses_seen))
            if reference
            else None,
            "finite": bool(np.isfinite(losses_seen).all()),
        },
        out,
    )


def note(r: dict) -> str:
    m = r["measure"]
    if m == "gemm":
        return f"{r['tflops']:.3g} TFLOP/s, datasheet {r['datasheet_tflops'] or '-'} ({r['device']})"
    if m == "score":
        return f"padding {r['padding']:.1%}, {r['model_gflop_per_token']} GFLOP/token"
    if m == "train":
        ckpt = "on" if r["activation_checkpointing"] else "off"
        same = (
            f", losses within {r['max_loss_difference_vs_off']:.1e} of off"
            if r["max_loss_difference_vs_off"] is not None
            else ""
        )
        return f"checkpointing {ckpt}, peak memory {r['peak_gpu_memory_gib'] or '-'} GiB{same}"
    if m == "exact":
        return f"IFD vs the reference: max relative difference {r['max_relative_ifd_difference']:.1e}"
    if m == "ranking":
        return f"bf16 vs fp32 on {r['samples']}: Spearman {r['spearman']:.4f}, top-5% {r['top5_overlap']:.0%}"
    if m == "oom":
        return f"{r['halvings']} halvings, all scored: {r['all_scored']} ({r['how']})"
    return f"{r['seconds']:.0f} s"


def table(records: list[dict]) -> None:
    """The summary: one line per measurement, the same columns on a CPU smoke run and on a GPU."""

    def cell(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    print(f"\n{'measure':8} {'shape':14} {'dtype':9} {'tokens/s':>10} {'MFU GEMM':>8} {'MFU peak':>8}  notes")
    for r in records:
        print(
            f"{r['measure']:8} {r.get('shape', r.get('size', '')):14} {r.get('dtype', ''):9} "
            f"{cell(r, 'tokens_per_s', ',.0f'):>10} {cell(r, 'mfu_measured_gemm', '.1%'):>8} "
            f"{cell(r, 'mfu_datasheet', '.1%'):>8}  {note(r)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the same code path (< 60 s)")
    ap.add_argument("--out", help="also write the JSON lines here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    plan, shapes = (SMOKE_PLAN, SMOKE_SHAPES) if device == "cpu" else (GPU_PLAN, SHAPES)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as the scorer's fp32 setting does
    out = open(args.out, "w") if args.out else None
    records = []

    name, peak_bf16, peak_fp32 = datasheet(device)
    rates = {}
    for dtype, peak in ((torch.bfloat16, peak_bf16), (torch.float32, peak_fp32)):
        key = str(dtype).split(".")[-1]
        rates[key] = gemm_tflops(plan["gemm"], dtype, device, seconds=2.0 if device == "cuda" else 0.5)
        rates[f"{key}_peak"] = peak
        records.append(
            emit(
                {
                    "measure": "gemm",
                    "size": f"{plan['gemm']}^3",
                    "dtype": key,
                    "tflops": round(rates[key], 4),
                    "datasheet_tflops": peak,
                    "device": name,
                },
                out,
            )
        )

    # The 1B shape: fp32 (exactness, fp32 throughput), then the same weights in bf16.
    model = build_model(shapes["llama-3.2-1b"], torch.float32, device)
    vocab = model.config.vocab_size
    samples = synthetic_samples(plan["n_bf16"], plan["max_len"], plan["scale"], vocab, seed=0)
    records.append(measure_exactness(model, plan, device, out))
    label = {"shape": "llama-3.2-1b", "dtype": "float32"}
    rec, ifd32 = measure_scoring(model, samples[: plan["n_fp32"]], plan["budget"], device, rates, label, out)
    records.append(rec)
    model = model.to(torch.bfloat16)
    label = {"shape": "llama-3.2-1b", "dtype": "bfloat16"}
    rec, ifd16 = measure_scoring(model, samples, plan["budget"], device, rates, label, out)
    records.append(rec)
    a, b = ifd32, ifd16[: plan["n_fp32"]]
    k = max(1, round(0.05 * len(a)))
    records.append(
        emit(
            {
                "measure": "ranking",
                "shape": "llama-3.2-1b",
                "samples": len(a),
                "spearman": spearman(a, b),
                "top5_overlap": len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k,
                "top5_k": k,
            },
            out,
        )
    )
    records.append(measure_oom(model, plan, device, out))
    # Both trainings start from the same weights on the same batches: their losses must agree.
    model = model.to(getattr(torch, plan["train_dtype"]))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = None
    for checkpointing in (False, True):
        model.load_state_dict(start)
        records.append(measure_training(model, plan, device, rates, checkpointing, out, reference))
        reference = records[-1]["losses"]
    del start
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    model = build_model(shapes["llama-3-8b"], torch.bfloat16, device)
    label = {"shape": "llama-3-8b", "dtype": "bfloat16"}
    rec, _ = measure_scoring(model, samples[: plan["n_bf16_8b"]], plan["budget"], device, rates, label, out)
    records.append(rec)
    records.append(
        emit({"measure": "total", "seconds": round(time.perf_counter() - t_start, 1), "device": name}, out)
    )
    table(records)
    if out:
        out.close()


if __name__ == "__main__":
    main()
