"""What a random projection (scoring.embedding_dim) and float16 storage (scoring.embedding_dtype) do to
the `embedding` selection method's picks, on real response embeddings.

    python benchmarks/bench_embeddings.py                  # --n 10000 --max-tokens 64 --dim 256

Embeddings: SmolLM2-135M-Instruct (the demo model, hidden 576) in fp32, the mean last hidden state
over each response's prior-pass span (the chat template over [assistant: response] alone, as iterit
scores it), the span cut to its first --max-tokens tokens, L2-normalised: what scoring stores today.
The template's head (its default system turn, then `<|im_start|>assistant\\n`) is the same tokens for
every response, so it runs once and its KV cache is shared by every batch; the first responses are
checked against iterit's own pooling (losses.span_nll_and_hidden over the whole prior text).
The responses are the final turns of the first --n usable conversations of the demo's ShareGPT
training file. The full embeddings are computed once and cached as .npy under --cache (keyed by n
and max-tokens): a rerun only selects.

IFD is fixed, a seeded uniform in (0.1, 0.9) (seed 0), so the picks differ only through the
embedding term. Selection: iterit.selection.window.select_window(method="embedding"), k = 5% of N,
on the stored embedding of each configuration:
  reference         full dimension, float32 (scoring's default)
  (dim, float32)    project_embeddings(emb, dim): a seeded Gaussian matrix, then L2-normalised
  (full, float16)   the reference rounded to float16 (as the Parquet column would hold it)
  (dim, float16)    both
and prints, against the reference: Jaccard of the selected sets, picks in the same place among the
first 100, and the stored bytes per sample (values alone, and a zstd Parquet column of them); with
two yardsticks from the same run: a second projection matrix (seed 1) and IFD-only ranking, which
ignores the embeddings (how far the diversity term moves the set at all).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import tempfile
import time

import numpy as np

DEFAULT_CACHE = os.path.expanduser("~/.cache/iterit/bench_embeddings")


def responses(path: str, n: int) -> list[str]:
    """The final turns of the first n conversations of `path` that normalise (file order)."""
    from iterit.config import DatasetConfig
    from iterit.data import normalise, read_records
    from iterit.errors import RowError

    ds, out = DatasetConfig(path=path, type="sharegpt"), []
    for _, rec in read_records(path):
        try:
            out.append(normalise(rec, ds)[-1]["content"])
        except (RowError, TypeError, KeyError):
            continue
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"{path} has only {len(out)} usable conversations; pass --n {len(out)} or fewer")
    return out


def prior_spans(tok, texts: list[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(head ids, span ids) per response: iterit's prior text and span, the span cut to max_tokens."""
    from iterit.errors import RowError
    from iterit.templates import template_batch

    out = []
    for i in range(0, len(texts), 256):
        convs = [[{"role": "assistant", "content": t}] for t in texts[i : i + 256]]
        for t in template_batch(tok, convs, 10**9):  # the conversation is the prior text itself
            if isinstance(t, RowError):
                raise SystemExit(f"response {len(out)} does not template: {t.reason} {t.detail}")
            out.append((t.prior_ids[: t.prior_start], t.prior_ids[t.prior_start :][:max_tokens]))
    return out


def pooled_embeddings(model, spans, batch: int) -> np.ndarray:
    """(n, H) float32 unit rows: mean last hidden state over each span, its head from a shared KV cache."""
    import torch

    body = model.base_model
    # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40); 4.x has only the old.
    key = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    emb = np.zeros((len(spans), model.config.hidden_size), dtype=np.float32)
    by_head: dict[tuple, list[int]] = {}
    for i, (head, _) in enumerate(spans):
        by_head.setdefault(tuple(head), []).append(i)
    with torch.inference_mode():
        for head, members in by_head.items():
            prefix = getattr(body(input_ids=torch.tensor([head]), use_cache=True), key)
            members.sort(key=lambda i: -len(spans[i][1]))  # alike lengths together: little padding
            for b in range(0, len(members), batch):
                rows = members[b : b + batch]
                T = len(spans[rows[0]][1])
                ids = torch.zeros((len(rows), T), dtype=torch.long)
                mask = torch.zeros((len(rows), T), dtype=torch.long)
                for r, i in enumerate(rows):
                    s = spans[i][1]
                    ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(rows))
                attn = torch.cat([torch.ones((len(rows), len(head)), dtype=torch.long), mask], dim=1)
                h = body(input_ids=ids, attention_mask=attn, **{key: cache}).last_hidden_state  # (B, T, H)
                pooled = (h.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, H)
                emb[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return emb


def check_against_iterit(model, spans, emb: np.ndarray, count: int = 8) -> float:
    """Max |difference| of the first `count` rows from iterit's pooling over the whole prior text."""
    import torch

    from iterit.scoring.losses import span_nll_and_hidden

    worst = 0.0
    with torch.inference_mode():
        for i in range(min(count, len(spans))):
            head, span = spans[i]
            _, pooled = span_nll_and_hidden(model, [head + span], [len(head)], [len(span)], 0, True)
            want = torch.nn.functional.normalize(pooled, dim=-1)[0].numpy()
            worst = max(worst, float(np.max(np.abs(want - emb[i]))))
    return worst


def full_embeddings(args) -> np.ndarray:
    path = os.path.join(args.cache, f"smollm2_n{args.n}_t{args.max_tokens}.npy")
    if os.path.exists(path):
        print(f"embeddings: cached {path}")
        return np.load(path)
    import torch

    from iterit.demo import prepare_demo
    from iterit.scoring.actor import load_model
    from iterit.templates import load_tokenizer

    torch.set_num_threads(args.threads)
    info = prepare_demo(log=lambda *_: None)
    texts = responses(info["train"], args.n)
    spans = prior_spans(load_tokenizer(info["model"]), texts, args.max_tokens)
    model = load_model(info["model"], "float32")
    tokens = sum(len(s) for _, s in spans)
    t0, c0 = time.perf_counter(), time.process_time()
    emb = pooled_embeddings(model, spans, args.batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    heads = len({tuple(h) for h, _ in spans})
    print(
        f"embeddings: {args.n} responses, {tokens:,} span tokens ({tokens / args.n:.1f} per response), "
        f"{heads} distinct template head(s) of {len(spans[0][0])} tokens; {wall:.0f} s wall, {cpu:.0f} s CPU "
        f"({tokens / cpu:.0f} tokens per CPU-second, {args.threads} thread(s))"
    )
    worst = check_against_iterit(model, spans, emb)
    print(f"  against iterit's pooling over the whole prior text: max |diff| {worst:.1e}")
    os.makedirs(args.cache, exist_ok=True)
    np.save(path + ".tmp.npy", emb)
    os.replace(path + ".tmp.npy", path)
    return emb


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def parquet_bytes(stored: np.ndarray) -> int:
    """Size of `stored` as a zstd Parquet FixedSizeList column (as scoring writes its parts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    typ = pa.float16() if stored.dtype == np.float16 else pa.float32()
    col = pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1), typ), stored.shape[1])
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(pa.table({"embedding": col}), os.path.join(d, "e.parquet"), compression="zstd")
        return os.path.getsize(os.path.join(d, "e.parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="conversations (responses) selected from")
    ap.add_argument("--max-tokens", type=int, default=64, help="span tokens per response")
    ap.add_argument("--dim", type=int, default=256, help="projected dimension")
    ap.add_argument("--ratio", type=float, default=0.05, help="k = ratio x n")
    ap.add_argument("--batch", type=int, default=128, help="responses per forward pass")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the embeddings")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="folder of the cached full embeddings")
    args = ap.parse_args()

    from iterit.scoring.losses import project_embeddings
    from iterit.selection.window import select_window

    emb = full_embeddings(args)
    n, h = emb.shape
    k = int(args.ratio * n)
    ifd = np.random.default_rng(0).uniform(0.1, 0.9, n)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, n, 20_000), rng.integers(0, n, 20_000)
    cos = np.sum(emb[a] * emb[b], axis=1)
    print(
        f"N = {n}, hidden {h}, k = {k}; cosines of 20,000 random pairs: mean {cos.mean():.3f}, "
        f"std {cos.std():.3f}, 5-95% [{np.quantile(cos, 0.05):.3f}, {np.quantile(cos, 0.95):.3f}]"
    )

    def picks(stored: np.ndarray, method: str = "embedding") -> tuple[list[int], float]:
        t0 = time.perf_counter()
        wo = select_window(ifd, k, method, embeddings=stored.astype(np.float32))
        return wo.picks, time.perf_counter() - t0

    ref, ref_s = picks(emb)
    proj = project_embeddings(emb, args.dim)
    pcos = np.sum(proj[a] * proj[b], axis=1)
    err = np.abs(pcos - cos)
    print(
        f"projection to {args.dim}, the same pairs: |cosine change| mean {err.mean():.4f}, "
        f"max {err.max():.4f}; correlation {np.corrcoef(cos, pcos)[0, 1]:.4f}"
    )
    configs = [
        (f"({args.dim}, float32)", proj),
        ("(full, float16)", emb.astype(np.float16)),
        (f"({args.dim}, float16)", proj.astype(np.float16)),
        (f"({args.dim}, float32), seed 1", project_embeddings(emb, args.dim, seed=1)),
    ]
    row = "{:<26} {:>8} {:>12} {:>9} {:>10} {:>9}"
    print(row.format("configuration", "Jaccard", "same of 100", "B/sample", "Parquet B", "select s"))
    for name, stored in [("(full, float32) reference", emb)] + configs:
        got, secs = (ref, ref_s) if stored is emb else picks(stored)
        same = sum(x == y for x, y in zip(got[:100], ref[:100]))  # picks in the same place, of min(k, 100)
        size = f"{parquet_bytes(stored) / n:.0f}"  # zstd Parquet bytes per sample
        print(row.format(name, f"{jaccard(got, ref):.3f}", same, stored.nbytes // n, size, f"{secs:.2f}"))
    got, _ = picks(emb, "ifd")
    print(row.format("IFD only (no embeddings)", f"{jaccard(got, ref):.3f}", "", "", "", ""))


if __name__ == "__main__":
    main()
