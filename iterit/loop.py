"""The iterative run (docs/architecture.md sections 1-3): stages over one run directory, recorded
in its manifest.

    iterit run configs/demo.yaml [--set key=value ...]      a fresh run in output_dir
    iterit run --resume RUN                                 go on from the first stage not done

    ingest                      corpus -> RUN/ingest/samples.parquet (N samples; their file order is
                                the initial order)
    for e in 0 .. iterations-1:
      proxy_score, proxy_select e = 0 with scoring.proxy_model: the proxy scores all N (rows must fit
                                the base model's template too) and orders them by the method
                                (RUN/iter_0/proxy); iteration 0's window is then that order's first
                                W = proxy_window candidates (default k x update_ratio), and score and
                                select below treat iteration 0 like a later one, with the base model
      score (iteration e)       e = 0: all N with the base model; e > 0: the first W = k x update_ratio
                                ids of the current order with iteration e-1's exported model (random
                                and longest, which do not read scores, keep iteration 0's for the window)
      select                    re-order those W (picks, then others, then candidates by IFD), k picks;
                                the iteration's order.parquet is the full order after e (tail: "tail")
      train                     one epoch over the k picks (Ray Train + DeepSpeed), resuming the
                                previous iteration's checkpoint; exports the iteration's model
    report                      RUN/report/

Paths and stage names come from iterit.rundir. A stage marked done is never redone: --resume reads
the manifest and the config saved in the run. Every stage is a function of its inputs and the seed, so
a resumed run ends with the selections of an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from iterit import cluster
from iterit.config import Config, config_from_dict, save_config
from iterit.errors import IteritError
from iterit.io import atomic_open, atomic_write_text, filesystem, join, read_parquet
from iterit.rundir import Manifest, RunDir, ScoreFiles, iter_scores, iteration_key, stage_name
from iterit.runlock import RunLock
from iterit.selection.stage import (
    diversity_inputs,
    pick_progress,
    remove_tfidf,
    sample_ids,
    score_columns,
    score_table,
    window_inputs,
)
from iterit.selection.window import reorder
from iterit.tracking import Tracker, run_key

# Methods whose order does not read the model's scores (only which samples were scored at all): later
# iterations keep iteration 0's scores for their window instead of running the model again.
SCORE_FREE = ("random", "longest")


# --------------------------------------------------------------------------------------------
# The stages


def score_stage(cfg: Config, run: RunDir, e: int, samples_path: str, log) -> dict:
    from iterit.scoring.pipeline import run_scoring
    from iterit.training.export import is_exported

    if e == 0 and cfg.scoring.proxy_model:  # the base model re-scores the proxy's window only
        window = proxy_order(run).slice(0, cfg.proxy_window(len(sample_ids(samples_path))))
        return run_scoring(cfg, samples_path, run.scoring(0).dir, only_ids=window.to_pylist(), log=log)
    if e == 0:
        return run_scoring(cfg, samples_path, run.scoring(0).dir, log=log)
    order = run.selection(e - 1).order_ids()
    window = order.slice(0, cfg.selection.window(len(order))).to_pylist()
    if cfg.selection.method in SCORE_FREE:
        return reuse_scores(run, e, window)
    model = run.model(e - 1)
    if not is_exported(model):
        raise IteritError(
            f"{model} is missing or incomplete: iteration {e - 1}'s training did not finish its export"
        )
    tuned = cfg.model_copy(update={"base_model": model})
    return run_scoring(tuned, samples_path, run.scoring(e).dir, only_ids=window, log=log)


def proxy_score_stage(cfg: Config, run: RunDir, samples_path: str, log) -> dict:
    """Iteration 0 with a proxy: the proxy scores every sample; a row counts only if it also fits the
    base model's template (templated, not scored), since the base model re-scores the window."""
    from iterit.scoring.pipeline import run_scoring

    return run_scoring(cfg.proxy(), samples_path, run.proxy_scoring().dir, fit_under=cfg, log=log)


def proxy_order(run: RunDir) -> pa.Array:
    """The order iteration 0 starts from with a proxy: the proxy's order (its picks, its others, its
    other candidates) with its others moved behind its candidates. Its others are rows the proxy
    rejected or found at IFD >= 1: not worth the base model's pass, so the window is the proxy's best
    W candidates."""
    order = read_parquet(run.proxy_selection().order, columns=["id", "status"])
    other = pc.equal(order.column("status"), "other")
    ids = pc.cast(order.column("id"), pa.string())
    return pa.concat_arrays(
        [ids.filter(pc.invert(other)).combine_chunks(), ids.filter(other).combine_chunks()]
    )


def reuse_scores(run: RunDir, e: int, window: list[str]) -> dict:
    """Iteration e's scores = iteration 0's rows of the window's ids, with no model run."""
    return copy_window_scores(run.scoring(0).written, run.scoring(e), window, iteration_key(0))


def copy_window_scores(source: str, out: ScoreFiles, window: list[str], reused_from: str) -> dict:
    """The rows of `source` (a scores folder) whose id is in the window, written as `out`'s scores and
    summary with no model run; `reused_from` says whose scores they are."""
    t0 = time.perf_counter()
    fs, folder = filesystem(out.scores)
    if fs.exists(folder):  # an interrupted earlier attempt: this is cheap to redo
        fs.rm(folder, recursive=True)
    wanted, kept = pa.array(window, pa.string()), 0
    for i, table in enumerate(iter_scores(source)):  # one part in memory at a time
        table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        if table.num_rows:
            with atomic_open(join(out.scores, f"reused-{i:05d}.parquet")) as f:
                pq.write_table(table, f, compression="zstd")
            kept += table.num_rows
    atomic_write_text(out.rejects, "")  # iteration 0's rejects.jsonl holds them all
    summary = {
        "rows": len(window),
        "scored": kept,
        "rejected": 0,
        "rejected_by_reason": {},
        "tokens": 0,
        "padding_fraction": 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
        "samples_per_s": 0.0,
        "tokens_per_s": 0.0,
        "resumed_rows": 0,
        "scored_rows": 0,
        "reused_from": reused_from,
        "scores": out.scores,
        "rejects": out.rejects,
    }
    atomic_write_text(out.summary, json.dumps(summary, indent=2) + "\n")
    return summary


def select_stage(
    cfg: Config, run: RunDir, e: int, samples_path: str, eos: str | None, log=print, proxy: bool = False
) -> dict:
    """Order the window of iteration e by the method and pick k (docs/architecture.md section 2, Iteration).

    Iteration 0 orders all N; later ones the first W of the previous order. With a proxy model,
    iteration 0 runs twice: `proxy=True` orders all N by the proxy's scores (RUN/iter_0/proxy), then
    the window of that order, re-scored by the base model, is ordered like a later iteration's."""
    t0 = time.perf_counter()
    sel = cfg.selection
    # Ids stay Arrow arrays and scores an Arrow table: at 10^7 samples their Python objects would be
    # gigabytes on the driver; what grows with N here is what the greedy reads (ifd, rows).
    ids = sample_ids(samples_path)
    n = len(ids)
    scored, files = (
        (run.proxy_scoring(), run.proxy_selection()) if proxy else (run.scoring(e), run.selection(e))
    )
    if proxy or (e == 0 and not cfg.scoring.proxy_model):
        current, w = ids, n
    elif e == 0:
        current, w = proxy_order(run), cfg.proxy_window(n)
    else:
        current, w = run.selection(e - 1).order_ids(), sel.window(n)
    window = current.slice(0, w)
    scores = score_table(scored.written, score_columns(sel.method))
    arrays = window_inputs(window, scores, sel.method, scored.written)
    del scores
    if current is ids:
        window_rows = np.arange(n)
    else:
        window_rows = pc.index_in(window, value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
    diversity = diversity_inputs(
        samples_path, window_rows, arrays["ifd"], sel.method, sel.tfidf, files.tfidf, eos, log
    )
    with pick_progress(sel.num_selected(n), sel.method) as on_picks:
        order, wo = reorder(
            current,
            arrays["ifd"],
            sel.num_selected(n),
            sel.method,
            **diversity,
            eos_token=eos,
            decay=sel.decay,
            seed=cfg.seed,
            iteration=e,
            tfidf_mode=sel.tfidf,
            n_response_tokens=arrays.get("n_response_tokens"),
            embeddings=arrays.get("embeddings"),
            on_picks=on_picks,
        )
    tail = len(order) - len(window)
    ifd = np.concatenate([arrays["ifd"][wo.order], np.full(tail, np.nan)])
    files.write(order, ifd, wo.status + ["tail"] * tail, wo.gains)
    remove_tfidf(files.tfidf)
    picked = arrays["ifd"][wo.picks]
    return {
        "samples": n,
        "window": len(window),
        "scored": int(np.isfinite(arrays["ifd"]).sum()),
        "candidates": wo.status.count("selected") + wo.status.count("candidate"),
        "k": len(wo.picks),
        "method": sel.method,
        "seconds": round(time.perf_counter() - t0, 2),
        "mean_ifd_selected": float(np.mean(picked)) if len(picked) else None,
    }


def train_stage(cfg: Config, run: RunDir, e: int, samples_path: str, manifest: Manifest, log) -> dict:
    from iterit.training.trainer import train

    picks = run.selection(e).read_picks()
    # The schedule is sized by the planned k; `full` trains on every candidate, which is its k.
    accepted = manifest.done("ingest")["accepted"]
    k = len(picks) if cfg.selection.method == "full" else cfg.selection.num_selected(accepted)
    prev = manifest.done(stage_name(e - 1, "train")) if e else None
    # Ray Train resumes a fit whose (storage_path, name) it has seen: a name unique to this run
    # keeps runs that share a storage_path apart.
    out = train(
        cfg,
        run.path,
        {e: picks},
        samples_path,
        k=k,
        resume_from=prev["checkpoint"] if prev else None,
        name=f"{run_key(run.path)}-{iteration_key(e)}",
        log=log,
    )
    return {
        **out["iterations"][e],
        "checkpoint": out["checkpoint"],
        "fit_seconds": out["fit_seconds"],
        "total_steps": out["total_steps"],
        "samples": len(picks),
    }


def prune_checkpoint(path: str | None, keep: str | None, log=print) -> None:
    """Delete a superseded checkpoint directory (local or URI); a missing one is already pruned."""
    if not path or path == keep:
        return
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)
        log(f"removed the superseded checkpoint {path} (keep_checkpoints: all keeps it)")


# --------------------------------------------------------------------------------------------
# Preflight and the run


def preflight(cfg: Config, run: RunDir, log=print) -> None:
    """What the config asks for against the cluster, before any work: one clear line, not a hang."""
    from iterit.templates import load_tokenizer
    from iterit.tracking import check_available
    from iterit.training.trainer import storage_path

    load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)  # the model is reachable
    if cfg.scoring.proxy_model:
        load_tokenizer(cfg.scoring.proxy_model, cfg.scoring.proxy_chat_template, cfg.trust_remote_code)
    cluster.check_pool_fits(cfg.scoring, cluster.scoring_gpus(cfg.scoring), log)
    per_worker = cluster.worker_resources(cfg.resources_per_worker, cluster.use_gpu(cfg.use_gpu))
    cluster.check_training_fits(cfg.ray_num_workers, per_worker, cfg.use_gpu, log)
    cluster.check_shared_storage([storage_path(cfg, run.path), cluster.absolute(run.path)])
    check_available(cfg.report_to)


def selection_check(files) -> callable:
    """A done selection stage's check (Manifest.run): its picks and order still read, with its counts."""
    return lambda r: files.damage(r["k"], r["samples"]) if {"k", "samples"} <= r.keys() else None


def read_run_config(run: RunDir) -> Config:
    """The run's config.yaml (local or an fsspec URI): the config a resumed run goes on with."""
    fs, p = filesystem(run.config)
    if not fs.exists(p):
        raise IteritError(f"{run.path} has no config.yaml: it is not a run directory that can be resumed")
    with fs.open(p, "r") as f:
        return config_from_dict(yaml.safe_load(f.read()) or {}, run.config)


def _open(cfg: Config | None, resume: str | None) -> tuple[Config, RunDir, Manifest]:
    """A resumed run's config and manifest, or a fresh run's (its directory must not hold a run)."""
    if resume:
        run = RunDir(resume)
        manifest = Manifest.load(run)
        return read_run_config(run), run, manifest
    run = RunDir(cfg.output_dir)
    if run.exists():
        raise IteritError(
            f"{run.path} already holds a run: continue it with `iterit run --resume {run.path}`, "
            "or set output_dir to a new directory"
        )
    save_config(cfg, run.config)
    return cfg, run, Manifest.create(run, seed=cfg.seed, iterations=cfg.iterations)


def run(cfg: Config | None = None, resume: str | None = None, log=print, take_over: bool = False) -> dict:
    """The whole loop. `cfg` starts a fresh run in cfg.output_dir; `resume` continues RUN. The driver holds
    the run's lock throughout (iterit.runlock): a second driver on the same run refuses; `take_over`
    takes the lock from a holder that looks alive."""
    if resume:
        Manifest.load(RunDir(resume))  # not a run: its one-line error, before the lock makes a folder
    with RunLock(resume or cfg.output_dir).held(take_over, log) as lock:
        return _run_locked(cfg, resume, log, lock)


def _run_locked(cfg: Config | None, resume: str | None, log, lock: RunLock) -> dict:
    from iterit.data import ingest
    from iterit.report import write_report
    from iterit.templates import load_tokenizer

    cfg, run, manifest = _open(cfg, resume)
    manifest.guard = lock.check
    cluster.connect()
    log(cluster.logs_line(run.path))
    preflight(cfg, run, log)
    t0 = time.perf_counter()
    ing = manifest.run("ingest", lambda: ingest(cfg.datasets, run.ingest, cfg.system_prompt), log)
    samples = ing["samples"]
    k = cfg.selection.num_selected(ing["accepted"])
    if k < cfg.ray_num_workers * cfg.micro_batch_size:
        raise IteritError(
            f"k = {k} selected samples cannot feed {cfg.ray_num_workers} workers x micro_batch_size "
            f"{cfg.micro_batch_size}: raise selection.ratio or lower ray_num_workers"
        )
    log(
        f"ingest: {ing['accepted']:,} of {ing['read']:,} rows accepted; k = {k:,} per iteration, "
        f"window W = {cfg.selection.window(ing['accepted']):,}"
    )
    eos = load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code).eos_token
    tracker = Tracker(cfg.report_to, run.path, cfg.model_dump(mode="json"))
    rows = []
    for e in range(cfg.iterations):
        name = functools.partial(stage_name, e)
        if e == 0 and cfg.scoring.proxy_model:
            p = manifest.run(
                name("proxy_score"),
                functools.partial(proxy_score_stage, cfg, run, samples, log),
                log,
                check=lambda _: run.proxy_scoring().damage(),
            )
            log(
                f"[{name('proxy_score')}] {p['scored']:,} scored by the proxy {cfg.scoring.proxy_model}, "
                f"{p['rejected']:,} rejected, {p['tokens_per_s']:,.0f} tokens/s"
            )
            p = manifest.run(
                name("proxy_select"),
                functools.partial(select_stage, cfg, run, 0, samples, eos, log, proxy=True),
                log,
                check=selection_check(run.proxy_selection()),
            )
            log(
                f"[{name('proxy_select')}] the proxy's order of {p['candidates']:,} candidates; "
                f"the base model re-scores its first {cfg.proxy_window(ing['accepted']):,}"
            )
        s = manifest.run(
            name("score"),
            functools.partial(score_stage, cfg, run, e, samples, log),
            log,
            check=lambda _, e=e: run.scoring(e).damage(),
        )
        if s.get("reused_from"):
            log(
                f"[{name('score')}] {s['scored']:,} of the window keep {s['reused_from']}'s scores "
                f"({cfg.selection.method} does not read them)"
            )
        else:
            log(
                f"[{name('score')}] {s['scored']:,} scored, {s['rejected']:,} rejected, "
                f"{s['tokens_per_s']:,.0f} tokens/s"
            )
        sel = manifest.run(
            name("select"),
            functools.partial(select_stage, cfg, run, e, samples, eos, log),
            log,
            check=selection_check(run.selection(e)),
        )
        log(
            f"[{name('select')}] {sel['k']:,} of {sel['window']:,} picked ({sel['candidates']:,} candidates) "
            f"in {sel['seconds']:.1f} s"
        )
        tr = manifest.run(
            name("train"), functools.partial(train_stage, cfg, run, e, samples, manifest, log), log
        )
        if e and cfg.keep_checkpoints == "last":  # iteration e resumes from e - 1's no more: it is done
            prune_checkpoint(
                manifest.done(stage_name(e - 1, "train"))["checkpoint"], keep=tr["checkpoint"], log=log
            )
        log(
            f"[{name('train')}] {tr['steps']} steps, loss {tr['final_loss']:.4f}, "
            f"{tr['tokens_per_s']:,.0f} tokens/s -> {tr['model']}"
        )
        tracker.log(
            {
                "score/scored": s["scored"],
                "score/rejected": s["rejected"],
                "score/tokens_per_s": s["tokens_per_s"],
                "select/seconds": sel["seconds"],
                "select/mean_ifd_selected": sel["mean_ifd_selected"],
                "train/mean_loss": tr["mean_loss"],
                "train/iteration_tokens_per_s": tr["tokens_per_s"],
            },
            e,
            axis="iteration",
        )
        rows.append(
            {
                "iteration": e,
                "scored": s["scored"],
                "k": sel["k"],
                "mean_ifd_selected": sel["mean_ifd_selected"],
                "train_loss": tr["mean_loss"],
                "steps": tr["steps"],
            }
        )
    rep = manifest.run("report", lambda: write_report(run.path), log)
    tracker.close()
    return {
        "run_dir": run.path,
        "iterations": rows,
        "report": rep["report"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
