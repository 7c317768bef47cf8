"""Selection methods side by side: the same model, data, budget and seeds for each, judged by held-out loss.

    iterit compare configs/demo.yaml --methods iterit,ifd,random,longest,full --seeds 42,43,44 \\
        --heldout data/heldout.jsonl [--gsm8k data/gsm8k.jsonl --gsm8k-limit 200] [--output DIR]

    OUT/shared/               ingest and iteration 0's scoring, run once (loop's own stages): they depend
                              on the base model and data only, not on the method or the seed
    OUT/shared/eval/base.json held-out loss (and GSM8K) of the base model, the common starting point
    OUT/seed_<s>/<method>/    one ordinary run directory per (seed, method), so `iterit report` works on it:
                              seeded with copies of the shared ingest/ and iter_0 scores and a manifest
                              that records those two stages as done ("shared_from"); loop.run(resume=...)
                              then skips them and does the rest
    RUN/eval/iter_<e>.json    held-out loss (and GSM8K) of RUN/model/iter_<e>
    OUT/compare.md, compare.json, compare.png

`full` trains on every scored sample for one iteration (iterations: 1). Stopped and started again, a
compare redoes nothing finished: the shared stages and every run resume from their manifests, and an
evaluation whose json exists is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
from collections.abc import Sequence

from iterit.config import Config, config_from_dict, save_config
from iterit.errors import IteritError
from iterit.io import atomic_open, atomic_write_text, filesystem, join, read_jsonl
from iterit.rundir import Manifest, RunDir, ScoreFiles, done_record, read_scores, stage_name
from iterit.selection.window import METHODS

SHARED = ("ingest", stage_name(0, "score"))  # the stages every run of a compare has in common
PROXY_SHARED = ("ingest", stage_name(0, "proxy_score"))  # ... and every `+proxy` run
PROXY_SUFFIX = "+proxy"  # `iterit+proxy`: method iterit, iteration 0 scored by scoring.proxy_model


def split_method(name: str) -> tuple[str, bool]:
    """`iterit+proxy` -> ("iterit", True): a method, and whether its iteration 0 scores with the proxy."""
    method, plus, rest = name.partition(PROXY_SUFFIX)
    return (method, True) if plus and not rest else (name, False)


def parse_methods(text: str, cfg: Config) -> list[str]:
    methods = list(dict.fromkeys(m.strip() for m in (text or "").split(",") if m.strip()))
    if not methods:
        raise IteritError(f"--methods is empty: give a comma-separated list of {', '.join(METHODS)}")
    unknown = [m for m in methods if split_method(m)[0] not in METHODS]
    if unknown:
        raise IteritError(
            f"--methods: unknown method {unknown[0]!r}; expected some of {', '.join(METHODS)}, each "
            f"optionally with {PROXY_SUFFIX} (iteration 0 scored by scoring.proxy_model)"
        )
    proxied = [m for m in methods if split_method(m)[1]]
    if proxied and not cfg.scoring.proxy_model:
        raise IteritError(
            f"--methods {proxied[0]} needs a proxy model: set scoring.proxy_model in the config "
            "(or --set scoring.proxy_model=PATH)"
        )
    if f"full{PROXY_SUFFIX}" in methods:
        raise IteritError(f"--methods full{PROXY_SUFFIX}: full trains on every sample; a proxy saves nothing")
    if any(split_method(m)[0] == "embedding" for m in methods) and not cfg.scoring.embeddings:
        raise IteritError(
            "--methods embedding needs response embeddings: drop scoring.embeddings: false "
            "(or --set scoring.embeddings=true)"
        )
    return methods


def parse_seeds(text: str | None, default: int) -> list[int]:
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip())) if text else [default]
    except ValueError:
        raise IteritError(
            f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 42,43,44"
        ) from None
    if not seeds:
        raise IteritError("--seeds is empty: give comma-separated integers, e.g. --seeds 42,43,44")
    return seeds


def run_config(base: Config, out: str, seed: int, method: str) -> Config:
    """The base config with this run's directory, seed and method; validated like a YAML config."""
    tree = base.model_dump(mode="json")
    tree.update(output_dir=join(out, f"seed_{seed}", method), seed=seed)
    tree["selection"]["method"], proxied = split_method(method)
    if not proxied:  # the plain method is the full path: the base model scores all of N
        tree["scoring"]["proxy_model"] = None
    if method == "full":  # everything, once (the loop sizes its schedule by the picks, all of N)
        tree["iterations"] = 1
    if base.storage_path:  # Ray Train resumes silently from a same-named fit: one checkpoint folder per run
        tag = hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:8]
        tree["storage_path"] = join(base.storage_path, f"compare-{tag}", f"seed_{seed}", method)
    return config_from_dict(tree, f"compare run seed {seed} method {method}")


def _read_json(path: str):
    fs, p = filesystem(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "r") as f:
        return json.load(f)


def _check_same(run_dir: str, cfg: Config) -> None:
    """A directory made by an earlier compare must have been made with this config, else its results lie."""
    from iterit.loop import read_run_config

    run = RunDir(run_dir)
    fs, p = filesystem(run.config)
    if not fs.exists(p):
        return
    saved = read_run_config(run).model_dump(mode="json")
    new = cfg.model_dump(mode="json")
    diff = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    if diff:
        raise IteritError(
            f"{run_dir} was made with another config (differs in {', '.join(diff)}): "
            "compare into a new --output, or rerun with the same config and --set"
        )


def shared_stages(base: Config, shared: str, log=print, proxy: bool = False) -> dict:
    """Ingest and iteration 0's scoring in OUT/shared, with loop's stage functions and the manifest;
    `proxy`: the proxy's pass over every sample too (the `+proxy` methods' iteration 0)."""
    from iterit.data import ingest
    from iterit.loop import proxy_score_stage, score_stage

    run = RunDir(shared)
    save_config(base, run.config)
    manifest = Manifest.open(run)
    ing = manifest.run(SHARED[0], lambda: ingest(base.datasets, run.ingest, base.system_prompt), log)
    full_path = base.model_copy(update={"scoring": base.scoring.model_copy(update={"proxy_model": None})})
    manifest.run(SHARED[1], lambda: score_stage(full_path, run, 0, ing["samples"], log), log)
    if proxy:
        manifest.run(PROXY_SHARED[1], lambda: proxy_score_stage(base, run, ing["samples"], log), log)
    return manifest.data


def _copy(src: str, dst: str, shared: str, run_dir: str) -> None:
    """Copy a shared file; summary json files get their paths pointed at the run's own copies."""
    fs, p = filesystem(src)
    with fs.open(p, "rb") as f:
        data = f.read()
    if src.endswith(".json"):
        data = json.dumps(_repoint(json.loads(data), shared, run_dir), indent=2).encode() + b"\n"
    with atomic_open(dst, "wb") as f:
        f.write(data)


def _repoint(obj, shared: str, run_dir: str):
    if isinstance(obj, dict):
        return {k: _repoint(v, shared, run_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_repoint(v, shared, run_dir) for v in obj]
    return run_dir + obj[len(shared) :] if isinstance(obj, str) and obj.startswith(shared + "/") else obj


def seed_run(cfg: Config, shared: str, shared_manifest: dict) -> None:
    """A fresh run directory that starts where the shared stages ended; the manifest is written last,
    so a directory without one is an interrupted seeding and is seeded again. A run with a proxy takes
    the proxy's pass (RUN/iter_0/proxy) and scores its own window; any other takes iteration 0's scores."""
    src, dst = RunDir(shared), RunDir(cfg.output_dir)
    proxied = bool(cfg.scoring.proxy_model)
    copies = [(src.ingest, dst.ingest)]
    copies.append((src.proxy(), dst.proxy()) if proxied else (src.iteration(0), dst.iteration(0)))
    for a, b in copies:
        fs, root = filesystem(a)
        for f in fs.find(root):
            rel = f[len(root.rstrip("/")) + 1 :]
            if ".tmp-" not in rel and not (not proxied and rel.startswith("proxy/")):
                _copy(join(a, rel), join(b, rel), src.path, dst.path)  # (not an atomic write's leftover)
    save_config(cfg, dst.config)
    # Done here at no cost: the time is the shared directory's, counted once.
    stages = {
        name: done_record(
            _repoint(rec["result"], src.path, dst.path), shared_from=src.path, shared_seconds=rec["seconds"]
        )
        for name, rec in ((n, shared_manifest["stages"][n]) for n in (PROXY_SHARED if proxied else SHARED))
    }
    Manifest.create(dst, seed=cfg.seed, iterations=cfg.iterations, stages=stages)


def evaluate(
    cfg: Config,
    model: str,
    run: RunDir,
    e: int | None,
    heldout: list[str],
    gsm8k: str | None,
    limit: int | None,
    log=print,
) -> dict:
    """Held-out loss (and GSM8K) of `model` -> run.eval_json(e) (e = None: the base model), its work in
    run.eval_dir(e); a part already there for the same inputs is kept."""
    from iterit.evaluation import evaluate_gsm8k, evaluate_loss

    path, work = run.eval_json(e), run.eval_dir(e)
    result = _read_json(path) or {"model": model}
    before = json.dumps(result, sort_keys=True)
    mcfg = cfg.model_copy(update={"base_model": model})
    if result.get("heldout") != list(heldout):
        result.update(heldout=list(heldout), loss=evaluate_loss(mcfg, list(heldout), work, log))
    if gsm8k and (result.get("gsm8k_file"), result.get("gsm8k_limit")) != (gsm8k, limit):
        result.update(
            gsm8k_file=gsm8k, gsm8k_limit=limit, gsm8k=evaluate_gsm8k(mcfg, gsm8k, work, limit=limit, log=log)
        )
    if json.dumps(result, sort_keys=True) != before:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# Numbers from the run directories, the table and the plot


def _stats(values: list[float]) -> dict:
    """mean and the sample std (n - 1; None for one seed) of per-seed values."""
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "values": values,
    }


def collect_run(run_dir: str, method: str, seed: int) -> dict:
    run = RunDir(run_dir)
    m = Manifest.load(run).data
    iters = m["iterations"]
    evals = {e: _read_json(run.eval_json(e)) or {} for e in range(iters)}
    tokens = [sum(r["tokens"] for r in read_jsonl(run.train_metrics(e))) for e in range(iters)]
    own = {k: st.get("seconds", 0.0) for k, st in m["stages"].items() if "shared_from" not in st}
    selections = [run.selection(e).read_selection() for e in range(iters)]
    picks = [[r["id"] for r in sel] for sel in selections]
    tokens_of = _by_id(run.scoring(0).written, ["n_response_tokens"])
    return {
        "method": method,
        "seed": seed,
        "run_dir": run_dir,
        "iterations": iters,
        "samples_per_iteration": [len(p) for p in picks],
        "picks": picks,
        "distinct_samples": len({i for p in picks for i in p}),
        # what the selection saw: the IFD of the picks under the model that scored them
        "picks_mean_ifd": [_mean([r["ifd"] for r in sel]) for sel in selections],
        "picks_mean_response_tokens": [
            _mean([tokens_of[i][0] if i in tokens_of else None for i in p]) for p in picks
        ],
        "tokens_per_iteration": tokens,
        "tokens": sum(tokens),
        "stage_seconds": own,
        "seconds": round(sum(own.values()), 2),
        "eval_seconds": round(
            sum(
                (ev.get("loss") or {}).get("seconds", 0) + (ev.get("gsm8k") or {}).get("seconds", 0)
                for ev in evals.values()
            ),
            2,
        ),
        "loss": [(evals[e].get("loss") or {}).get("loss") for e in range(iters)],
        "ppl": [(evals[e].get("loss") or {}).get("ppl") for e in range(iters)],
        "gsm8k": [(evals[e].get("gsm8k") or {}).get("exact_match") for e in range(iters)],
    }


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and v == v]  # v == v: not NaN
    return statistics.fmean(vals) if vals else None


def _by_id(scores_path: str, columns: list[str]) -> dict[str, tuple]:
    """id -> the values of `columns` for every scored row of a scores folder (or file); {} without one."""
    fs, p = filesystem(scores_path)
    if not fs.exists(p):
        return {}
    t = read_scores(scores_path, ["id", *columns])
    return dict(zip(t.column("id").to_pylist(), zip(*(t.column(c).to_pylist() for c in columns))))


def selection_overlap(runs: list[dict], methods: list[str]) -> list[dict]:
    """Jaccard |A & B| / |A | B| of two methods' picks in each iteration, per seed and their mean, for
    every pair of methods that select (full trains on everything, so it is left out)."""
    by = {(r["method"], r["seed"]): r["picks"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    selecting = [m for m in methods if m != "full"]
    out = []
    for i, a in enumerate(selecting):
        for b in selecting[i + 1 :]:
            width = min(len(by[(a, seeds[0])]), len(by[(b, seeds[0])]))
            per_iter = []
            for e in range(width):
                vals = []
                for seed in seeds:
                    pa_, pb = set(by[(a, seed)][e]), set(by[(b, seed)][e])
                    vals.append(len(pa_ & pb) / len(pa_ | pb) if pa_ | pb else 1.0)
                per_iter.append(_stats(vals))
            out.append({"methods": [a, b], "jaccard_per_iteration": per_iter})
    return out


def heldout_losses(run_dir: str, e: int) -> dict[str, tuple[float, int]]:
    """id -> (span loss, span tokens) of each held-out conversation under RUN/model/iter_e."""
    return _by_id(ScoreFiles(RunDir(run_dir).eval_dir(e)).written, ["loss_cond", "n_response_tokens"])


def paired_bootstrap(runs: list[dict], methods: list[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """Each method's final held-out loss minus the first method's, with a 95% interval from resampling
    the held-out conversations (the same resample for both, so the spread is that of the difference).

    Per conversation the loss is averaged over seeds; a resample's loss is token-weighted, as the
    held-out loss is. The seeds' spread says how much training order moves a result; this interval
    says how much the choice of held-out conversations does, which at a few dozen is the larger."""
    import numpy as np

    per_method = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        tables = [heldout_losses(r["run_dir"], r["iterations"] - 1) for r in rs]
        if not tables or not all(tables):
            return {}
        ids = sorted(set.intersection(*(set(t) for t in tables)))
        per_method[m] = {i: (float(np.mean([t[i][0] for t in tables])), tables[0][i][1]) for i in ids}
    ref = methods[0]
    ids = sorted(set.intersection(*(set(v) for v in per_method.values())))
    if not ids:
        return {}
    w = np.array([per_method[ref][i][1] for i in ids], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))  # (B, n)
    weights = w[picks]

    def loss(m):
        x = np.array([per_method[m][i][0] for i in ids])
        return float(np.sum(w * x) / np.sum(w)), np.sum(weights * x[picks], axis=1) / np.sum(weights, axis=1)

    ref_point, ref_boot = loss(ref)
    out = {"reference": ref, "conversations": len(ids), "resamples": n_boot, "methods": {}}
    for m in methods[1:]:
        point, boot = loss(m)
        diff = boot - ref_boot
        lo, hi = np.quantile(diff, [0.025, 0.975])
        out["methods"][m] = {
            "difference": point - ref_point,
            "low": float(lo),
            "high": float(hi),
            "fraction_lower": float(np.mean(diff < 0)),
        }
    return out


def summarise(runs: list[dict], methods: list[str]) -> dict:
    out = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        iters = rs[0]["iterations"]
        out[method] = {
            "iterations": iters,
            "seeds": [r["seed"] for r in rs],
            "samples_per_iteration": rs[0]["samples_per_iteration"],
            "final_loss": _stats([r["loss"][-1] for r in rs]),
            "final_ppl": _stats([r["ppl"][-1] for r in rs]),
            "final_gsm8k": _stats([r["gsm8k"][-1] for r in rs]),
            "loss_per_iteration": [_stats([r["loss"][e] for r in rs]) for e in range(iters)],
            "gsm8k_per_iteration": [_stats([r["gsm8k"][e] for r in rs]) for e in range(iters)],
            "tokens": _stats([r["tokens"] for r in rs]),
            "distinct_samples": _stats([r["distinct_samples"] for r in rs]),
            "picks_mean_ifd": [_stats([r["picks_mean_ifd"][e] for r in rs]) for e in range(iters)],
            "picks_mean_response_tokens": [
                _stats([r["picks_mean_response_tokens"][e] for r in rs]) for e in range(iters)
            ],
            "seconds": round(sum(r["seconds"] for r in rs), 2),
            "eval_seconds": round(sum(r["eval_seconds"] for r in rs), 2),
        }
    return out


def _pm(s: dict, spec: str = ".4f") -> str:
    if s["mean"] is None:
        return "-"
    return format(s["mean"], spec) + (f" ± {s['std']:{spec}}" if s["std"] is not None else " ± -")


def _num(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def to_markdown(data: dict) -> str:
    summ, base, shared = data["summary"], data["base"], data["shared"]
    width = max(s["iterations"] for s in summ.values())
    lines = [
        "# Selection methods compared",
        "",
        f"Base model `{data['base_model']}`; N = {shared['accepted']:,} accepted samples; budget "
        f"ratio {data['ratio']} (k = {shared['k']:,} per iteration); {data['iterations']} iterations; "
        f"seeds {', '.join(map(str, data['seeds']))}; held-out: {', '.join(data['heldout'])} "
        f"({base['loss']['n']:,} samples, {base['loss']['tokens']:,} response tokens). Mean ± sample std "
        "over seeds ('-' with one seed).",
        "",
        "## Held-out response loss after the last iteration",
        "",
        "| method | iterations | samples per iteration | loss | perplexity | loss per seed | "
        "tokens trained (mean per seed) | wall-clock s (all seeds) |",
        "|---|---|---|---|---|---|---|---|",
        f"| base model | 0 | - | {_num(base['loss']['loss'])} | {_num(base['loss']['ppl'], '.2f')} "
        "| - | - | - |",
    ]
    for method, s in summ.items():
        per_seed = ", ".join(f"{seed}: {_num(v)}" for seed, v in zip(s["seeds"], s["final_loss"]["values"]))
        iters = (
            f"{s['iterations']} (overridden: full trains on everything once)"
            if method == "full"
            else s["iterations"]
        )
        lines.append(
            f"| {method} | {iters} | {', '.join(f'{n:,}' for n in s['samples_per_iteration'])} | "
            f"{_pm(s['final_loss'])} | {_pm(s['final_ppl'], '.2f')} | {per_seed} | "
            f"{_num(s['tokens']['mean'], ',.0f')} | {s['seconds']:,.1f} |"
        )
    cols = " | ".join(f"after iter {e}" for e in range(width))
    lines += [
        "",
        "## Held-out loss per iteration",
        "",
        f"| method | base | {cols} |",
        "|---" * (width + 2) + "|",
    ]
    for method, s in summ.items():
        cells = [_pm(x) for x in s["loss_per_iteration"]] + ["-"] * (width - s["iterations"])
        lines.append(f"| {method} | {_num(base['loss']['loss'])} | {' | '.join(cells)} |")
    if "gsm8k" in base:
        lines += [
            "",
            f"## GSM8K exact match ({base['gsm8k']['n']:,} questions)",
            "",
            f"| method | base | {cols} |",
            "|---" * (width + 2) + "|",
        ]
        for method, s in summ.items():
            cells = [_pm(x, ".3f") for x in s["gsm8k_per_iteration"]] + ["-"] * (width - s["iterations"])
            lines.append(f"| {method} | {base['gsm8k']['exact_match']:.3f} | {' | '.join(cells)} |")
    lines += [
        "",
        "## What each method picked",
        "",
        "Mean over seeds, per iteration: the IFD of the picks under the model that scored them, and their "
        "response length (the scored span, in tokens). Distinct: samples trained at least once over all "
        "iterations.",
        "",
        "| method | mean IFD of picks | mean response tokens of picks | distinct samples trained |",
        "|---|---|---|---|",
    ]
    for method, s in summ.items():
        ifd = ", ".join(_num(x["mean"], ".3f") for x in s["picks_mean_ifd"])
        toks = ", ".join(_num(x["mean"], ".0f") for x in s["picks_mean_response_tokens"])
        lines.append(f"| {method} | {ifd} | {toks} | {_num(s['distinct_samples']['mean'], ',.1f')} |")
    if data.get("overlap"):
        cols = " | ".join(f"iter {e}" for e in range(width))
        lines += [
            "",
            "## How much the selections agree",
            "",
            "Jaccard |A ∩ B| / |A ∪ B| of two methods' picks in the same iteration, mean ± std over seeds.",
            "",
            f"| methods | {cols} |",
            "|---" * (width + 1) + "|",
        ]
        for o in data["overlap"]:
            cells = [_pm(x, ".2f") for x in o["jaccard_per_iteration"]]
            cells += ["-"] * (width - len(cells))
            lines.append(f"| {' vs '.join(o['methods'])} | {' | '.join(cells)} |")
    boot = data.get("paired")
    if boot and boot.get("methods"):
        ref = boot["reference"]
        lines += [
            "",
            f"## Against {ref}, paired over the held-out conversations",
            "",
            f"Final held-out loss minus {ref}'s (each conversation's loss averaged over seeds; negative: "
            f"better than {ref}), with a 95% interval from {boot['resamples']:,} resamples of the "
            f"{boot['conversations']:,} held-out conversations, and the share of resamples in which the "
            f"method's loss is the lower.",
            "",
            f"| method | loss - {ref}'s | 95% interval | resamples lower |",
            "|---|---|---|---|",
        ]
        for m, b in boot["methods"].items():
            lines.append(
                f"| {m} | {b['difference']:+.4f} | [{b['low']:+.4f}, {b['high']:+.4f}] | "
                f"{b['fraction_lower']:.0%} |"
            )
    lines += [
        "",
        "## Time",
        "",
        f"Shared by every run, counted once ({shared['dir']}): ingest {shared['ingest_seconds']:,.1f} s, "
        f"iteration 0 scoring {shared['score_seconds']:,.1f} s; base-model evaluation "
        f"{data['base_eval_seconds']:,.1f} s.",
        "",
        "| method | run stages s (all seeds) | evaluation s (all seeds) |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {s['seconds']:,.1f} | {s['eval_seconds']:,.1f} |" for m, s in summ.items()]
    return "\n".join(lines) + "\n"


def plot(data: dict) -> bytes:
    """Held-out loss vs iteration: the base at x = 0 (and dashed), iteration e at x = e + 1."""
    from matplotlib.figure import Figure  # the Agg canvas; no pyplot state

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    base = data["base"]["loss"]["loss"]
    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base model")
    width = 0
    for method, s in data["summary"].items():
        ys = [x["mean"] for x in s["loss_per_iteration"]]
        err = [x["std"] or 0.0 for x in s["loss_per_iteration"]]
        width = max(width, len(ys))
        if method == "full":  # one epoch over everything: a point, not a trajectory
            ax.errorbar(
                [1], ys, yerr=err, fmt="*", markersize=12, capsize=4, label="full (all samples, 1 epoch)"
            )
        else:
            ax.errorbar(
                range(len(ys) + 1), [base] + ys, yerr=[0.0] + err, marker="o", capsize=4, label=method
            )
    ax.set_xticks(range(width + 1), ["base"] + [f"iter {e}" for e in range(width)])
    ax.set(
        xlabel="model",
        ylabel="held-out response loss (nats/token)",
        title=f"Held-out loss per method (mean ± std over {len(data['seeds'])} seed(s))",
    )
    ax.legend(fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The whole comparison


def compare(
    cfg: Config,
    methods: Sequence[str],
    seeds: Sequence[int],
    heldout: Sequence[str],
    output: str | None = None,
    gsm8k: str | None = None,
    gsm8k_limit: int | None = None,
    log=print,
) -> dict:
    """Run every (seed, method), evaluate every model, write OUT/compare.{md,json,png}; returns the json."""
    from iterit import cluster
    from iterit.data import expand_paths
    from iterit.loop import preflight, run

    if not heldout:
        raise IteritError(
            "compare needs held-out data to judge the methods: pass --heldout FILE (repeatable)"
        )
    for path in [*heldout, *([gsm8k] if gsm8k else [])]:  # a bad path fails now, not after hours of training
        expand_paths(path)
    out = output or join(cfg.output_dir, "compare")
    shared = join(out, "shared")
    base = cfg.model_copy(update={"output_dir": shared})
    runs = {(s, m): run_config(cfg, out, s, m) for s in seeds for m in methods}
    for rc in [base, *runs.values()]:  # before any work: a changed config must not mix with old results
        _check_same(rc.output_dir, rc)
    cluster.connect()
    preflight(base, RunDir(shared), log)
    sm = shared_stages(base, shared, log, proxy=any(split_method(m)[1] for m in methods))
    for (seed, method), rc in runs.items():
        rd = RunDir(rc.output_dir)
        if not rd.exists():
            seed_run(rc, shared, sm)
        elif Manifest.load(rd).done("report") is not None:
            continue  # finished earlier
        log(f"[compare] seed {seed}, method {method}: {rc.output_dir}")
        run(rc, resume=rc.output_dir, log=log)
    base_eval = evaluate(base, base.base_model, RunDir(shared), None, heldout, gsm8k, gsm8k_limit, log)
    for rc in runs.values():
        rd = RunDir(rc.output_dir)
        for e in range(rc.iterations):
            evaluate(base, rd.model(e), rd, e, heldout, gsm8k, gsm8k_limit, log)
    collected = [collect_run(rc.output_dir, m, s) for (s, m), rc in runs.items()]
    st = sm["stages"]
    accepted = st["ingest"]["result"]["accepted"]
    data = {
        "output": out,
        "base_model": cfg.base_model,
        "methods": list(methods),
        "seeds": list(seeds),
        "heldout": list(heldout),
        "gsm8k": gsm8k,
        "gsm8k_limit": gsm8k_limit,
        "ratio": cfg.selection.ratio,
        "iterations": cfg.iterations,
        "shared": {
            "dir": shared,
            "accepted": accepted,
            "k": cfg.selection.num_selected(accepted),
            "scored": st[SHARED[1]]["result"]["scored"],
            "ingest_seconds": st["ingest"]["seconds"],
            "score_seconds": st[SHARED[1]]["seconds"],
        },
        "base": {
            k: base_eval[k] for k in ("loss", "gsm8k") if k == "loss" or gsm8k
        },  # not an old call's GSM8K
        "base_eval_seconds": round(
            base_eval["loss"]["seconds"] + (base_eval.get("gsm8k") or {}).get("seconds", 0), 2
        ),
        "summary": summarise(collected, list(methods)),
        "overlap": selection_overlap(collected, list(methods)),
        "paired": paired_bootstrap(collected, list(methods)),
        "runs": [{k: v for k, v in r.items() if k != "picks"} for r in collected],  # ids stay in the run dirs
    }
    atomic_write_text(join(out, "compare.json"), json.dumps(data, indent=2) + "\n")
    atomic_write_text(join(out, "compare.md"), to_markdown(data))
    with atomic_open(join(out, "compare.png"), "wb") as f:
        f.write(plot(data))
    return data
