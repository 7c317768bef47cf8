"""Proxy scoring agreement: does a small model's IFD pick what the base model's IFD picks (SmolLM2-135M vs
Gemma-3-270M on demo ShareGPT, both pairings)?

    python benchmarks/bench_proxy.py                          # --n 1500 --sequence-len 64
    python benchmarks/bench_proxy.py --n 400 --out /tmp/p.json

Corpus: the first --n demo ShareGPT conversations (training split, file order) whose response keeps at
least one token within --sequence-len under BOTH models' chat templates. Every one is scored by both
models through iterit's own scoring stage (run_scoring: Ray Data, one fp32 actor on the CPU's cores).
Then, for each pairing (target = the base model, proxy = the other):
  - Spearman of IFD, proxy vs target: over all samples scored by both, over the target's top-W, over
    the proxy's top-W (the W highest IFDs below 1; W = 3k, the window of later iterations)
  - the k = 5% `iterit` selections (IFD x TF-IDF diversity, decay 0.1): (a) target's scores alone,
    (b) proxy's alone, (c) proxy's order, its first W re-scored by the target and selected from, as
    iterit's loop does with scoring.proxy_model (loop.select_stage: select_window, then reorder);
    Jaccard of (b) and (c) with (a), and the expected Jaccard of two random k-subsets of the target's
    candidates (exact, hypergeometric)
  - forward FLOPs of each path (2 x parameters x tokens, both passes; (a) = target over N, (b) = proxy
    over N, (c) = proxy over N + target over the W) and scoring wall-clock ((c)'s target part: the
    target's measured seconds per token over the W's tokens)
Prints a table and writes everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa


def build_corpus(info: dict, models: dict[str, str], n: int, seq_len: int, read_rows: int, out_dir: str):
    """The messages JSONL of the first n conversations that fit every model's template, ingested."""
    from iterit.config import config_from_dict
    from iterit.data import ingest, read_samples
    from iterit.errors import RowError
    from iterit.templates import load_tokenizer, template_batch

    cfg = config_from_dict(
        {
            "base_model": models["target"],
            "datasets": [{"path": info["train"], "type": "sharegpt", "max_samples": read_rows}],
        }
    )
    summary = ingest(cfg.datasets, os.path.join(out_dir, "all"), cfg.system_prompt)
    table = read_samples(summary["samples"])
    ids, convs = table.column("id").to_pylist(), table.column("messages").to_pylist()
    fits = np.ones(len(ids), dtype=bool)
    for path in models.values():
        tok = load_tokenizer(path)
        for i in range(0, len(convs), 256):
            res = template_batch(tok, convs[i : i + 256], seq_len)
            fits[i : i + len(res)] &= np.array([not isinstance(r, RowError) for r in res])
    keep = np.flatnonzero(fits)[:n]
    path = os.path.join(out_dir, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in keep:
            f.write(json.dumps({"id": ids[i], "messages": convs[i]}, ensure_ascii=False) + "\n")
    cfg = config_from_dict({"base_model": models["target"], "datasets": [{"path": path, "type": "messages"}]})
    samples = ingest(cfg.datasets, os.path.join(out_dir, "ingest"), cfg.system_prompt)["samples"]
    return samples, {"read": summary["read"], "fit_both": int(fits.sum()), "kept": len(keep)}


def scoring_config(model: str, seq_len: int):
    from iterit.config import config_from_dict

    cores = os.cpu_count() or 1
    return config_from_dict(
        {
            "base_model": model,
            "datasets": [{"path": "unused"}],
            "sequence_len": seq_len,
            "selection": {"ratio": 0.05, "update_ratio": 3, "decay": 0.1},
            # demo_config's scoring: one actor computing on every core, fp32.
            "scoring": {
                "dtype": "float32",
                "cpus_per_actor": 1,
                "torch_threads": cores,
                "template_cpus": 0.5,
                "batch_size": 64,
                "token_budget": 4096,
                "embeddings": False,
            },
        }
    )


def score(model: str, samples: str, seq_len: int, out_dir: str, ids) -> dict:
    """run_scoring on every sample: ifd and real tokens aligned with `ids`, seconds, parameters."""
    from iterit.rundir import ScoreFiles
    from iterit.scoring.pipeline import run_scoring
    from iterit.selection.stage import score_table, window_inputs

    cfg = scoring_config(model, seq_len)
    t0 = time.perf_counter()
    summary = run_scoring(cfg, samples, out_dir, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    written = ScoreFiles(out_dir).written
    table = score_table(written, ["id", "ifd", "real_tokens"])
    ifd = window_inputs(ids, table, "iterit", written)["ifd"]
    tok_of = dict(zip(table.column("id").to_pylist(), table.column("real_tokens").to_pylist()))
    tokens = np.array([tok_of.get(i) or 0 for i in ids.to_pylist()], dtype=np.int64)
    return {
        "model": model,
        "ifd": ifd,
        "tokens": tokens,
        "seconds": seconds,
        "params": parameter_count(model),
        "scored": summary["scored"],
        "rejected": summary["rejected"],
        "padding": summary["padding_fraction"],
    }


def parameter_count(model: str) -> int:
    from safetensors import safe_open

    n = 0
    for name in sorted(os.listdir(model)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model, name), "pt") as f:
                n += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return n


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def random_jaccard(n: int, k: int) -> float:
    """E[|A & B| / |A | B|] for two independent uniform k-subsets of n (hypergeometric overlap)."""
    if k == 0:
        return float("nan")
    total = math.comb(n, k)
    return sum(
        math.comb(k, x) * math.comb(n - k, k - x) / total * x / (2 * k - x)
        for x in range(max(0, 2 * k - n), k + 1)
    )


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else float("nan")


def pairing(target: dict, proxy: dict, ids, samples: str, k: int, w: int, eos: str | None, seed: int) -> dict:
    """The figures of one pairing; selections as loop.select_stage makes them (iteration 0)."""
    from iterit.selection.stage import read_responses
    from iterit.selection.window import reorder, select_window

    n = len(ids)
    kw = {"eos_token": eos, "decay": 0.1, "seed": seed, "iteration": 0, "tfidf_mode": "auto"}
    responses = read_responses(samples, np.arange(n))
    ta, pi = target["ifd"], proxy["ifd"]
    both = np.isfinite(ta) & np.isfinite(pi)
    idx = np.flatnonzero(both)
    # Top-W: the W highest IFDs among a model's candidates (IFD < 1, what the IFD-based methods pick from).
    ct, cp = idx[ta[idx] < 1], idx[pi[idx] < 1]
    top_t = ct[np.argsort(-ta[ct], kind="stable")[:w]]
    top_p = cp[np.argsort(-pi[cp], kind="stable")[:w]]
    # (a), (b): one window = all N in file order.
    a = select_window(ta, k, "iterit", responses=responses, **kw)
    b = select_window(pi, k, "iterit", responses=responses, **kw)
    # (c): the proxy's order with its others (IFD >= 1, rejected) behind its candidates, as
    # loop.proxy_order; its first W re-scored by the target, ordered like a later iteration's.
    order_b, others = np.asarray(b.order), np.asarray(b.status) == "other"
    proxy_order = np.concatenate([order_b[~others], order_b[others]])
    current = ids.take(pa.array(proxy_order, pa.int64()))
    window_rows = proxy_order[:w]
    _, c = reorder(current, ta[window_rows], k, "iterit", responses=[responses[i] for i in window_rows], **kw)
    picks_a = set(a.picks)
    picks_b = set(b.picks)
    picks_c = set(window_rows[c.picks].tolist())
    cand_t = int(np.sum(np.isfinite(ta) & (ta < 1)))
    flops = {
        "a": 2.0 * target["params"] * int(target["tokens"].sum()),
        "b": 2.0 * proxy["params"] * int(proxy["tokens"].sum()),
    }
    w_tokens = int(target["tokens"][window_rows].sum())
    flops["c"] = flops["b"] + 2.0 * target["params"] * w_tokens
    t_rate = target["seconds"] / max(1, int(target["tokens"].sum()))
    return {
        "target": target["model"],
        "proxy": proxy["model"],
        "n": n,
        "scored_by_both": int(both.sum()),
        "k": k,
        "W": w,
        "target_candidates": cand_t,
        "proxy_candidates": int(np.sum(np.isfinite(pi) & (pi < 1))),
        "window_proxy_candidates": int(np.sum(np.isfinite(pi[window_rows]) & (pi[window_rows] < 1))),
        "window_target_candidates": int(np.sum(np.isfinite(ta[window_rows]) & (ta[window_rows] < 1))),
        "spearman_all": spearman(pi[idx], ta[idx]),
        "spearman_target_top_w": spearman(pi[top_t], ta[top_t]),
        "spearman_proxy_top_w": spearman(pi[top_p], ta[top_p]),
        "jaccard_b_vs_a": jaccard(picks_b, picks_a),
        "jaccard_c_vs_a": jaccard(picks_c, picks_a),
        "jaccard_random_expected": random_jaccard(cand_t, min(k, cand_t)),
        "a_picks_in_window": len(picks_a & set(window_rows.tolist())),
        "flops": flops,
        "flops_c_over_a": flops["c"] / flops["a"],
        "seconds": {
            "a": target["seconds"],
            "b": proxy["seconds"],
            "c": proxy["seconds"] + t_rate * w_tokens,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1500, help="conversations scored by both models")
    ap.add_argument("--sequence-len", type=int, default=64)
    ap.add_argument("--read-rows", type=int, default=17_471, help="ShareGPT training rows read at most")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="bench_proxy.json")
    args = ap.parse_args()

    from iterit import cluster
    from iterit.demo import prepare_demo
    from iterit.selection.stage import sample_ids
    from iterit.templates import load_tokenizer

    t_start = time.perf_counter()
    info = prepare_demo(log=print, proxy=True)
    models = {"target": info["model"], "proxy": info["proxy_model"]}  # SmolLM2-135M-Instruct, Gemma-3-270M
    names = {info["model"]: "SmolLM2-135M-Instruct", info["proxy_model"]: "Gemma-3-270M"}
    with tempfile.TemporaryDirectory() as tmp:
        samples, corpus = build_corpus(info, models, args.n, args.sequence_len, args.read_rows, tmp)
        ids = sample_ids(samples)
        print(
            f"corpus: {corpus['kept']:,} of {corpus['read']:,} ShareGPT rows read "
            f"({corpus['fit_both']:,} fit both templates at sequence_len {args.sequence_len})",
            flush=True,
        )
        cluster.connect()
        scored = {}
        for role, path in models.items():
            scored[role] = s = score(path, samples, args.sequence_len, os.path.join(tmp, role), ids)
            print(
                f"{names[path]:22} scored {s['scored']:,} (rejected {s['rejected']}), "
                f"{int(s['tokens'].sum()):,} tokens in {s['seconds']:.0f} s "
                f"({s['tokens'].sum() / s['seconds']:.0f} tokens/s, padding {s['padding']:.1%}), "
                f"{s['params']:,} parameters",
                flush=True,
            )
        cfg = scoring_config(models["target"], args.sequence_len)
        n = len(ids)
        k, w = cfg.selection.num_selected(n), cfg.selection.window(n)
        results = []
        for t_role, p_role in (("target", "proxy"), ("proxy", "target")):
            eos = load_tokenizer(models[t_role]).eos_token  # the loop's: the base model's eos
            r = pairing(scored[t_role], scored[p_role], ids, samples, k, w, eos, args.seed)
            r["target"], r["proxy"] = names[r["target"]], names[r["proxy"]]
            results.append(r)
    for r in results:
        print(
            f"\ntarget {r['target']}, proxy {r['proxy']}: N {r['n']:,} "
            f"(both scored {r['scored_by_both']:,}), "
            f"k {r['k']}, W {r['W']}; target candidates (IFD < 1) {r['target_candidates']:,}, proxy's "
            f"{r['proxy_candidates']:,}; of the W, {r['window_proxy_candidates']} proxy candidates and "
            f"{r['window_target_candidates']} target candidates; {r['a_picks_in_window']} of (a)'s picks in W"
        )
        print(
            f"  Spearman(proxy, target) IFD: all {r['spearman_all']:.3f}, target's top-W "
            f"{r['spearman_target_top_w']:.3f}, proxy's top-W {r['spearman_proxy_top_w']:.3f}"
        )
        print(
            f"  Jaccard with (a): (b) proxy alone {r['jaccard_b_vs_a']:.3f}, (c) proxy + W re-scored "
            f"{r['jaccard_c_vs_a']:.3f}, random k-subsets (expected) {r['jaccard_random_expected']:.3f}"
        )
        f, s = r["flops"], r["seconds"]
        print(
            f"  forward FLOPs (a) {f['a']:.3g}, (b) {f['b']:.3g}, (c) {f['c']:.3g} "
            f"(c/a {r['flops_c_over_a']:.2f}); "
            f"scoring seconds (a) {s['a']:.0f}, (b) {s['b']:.0f}, (c) {s['c']:.0f} (target part estimated)"
        )
    out = {
        "args": vars(args),
        "corpus": corpus,
        "scoring": {
            names[s["model"]]: {
                key: (int(s["tokens"].sum()) if key == "tokens" else s[key])
                for key in ("tokens", "seconds", "params", "scored", "rejected", "padding")
            }
            for s in scored.values()
        },
        "pairings": results,
        "wall_seconds": time.perf_counter() - t_start,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"\nwall {out['wall_seconds']:.0f} s; written {args.out}")


if __name__ == "__main__":
    main()
