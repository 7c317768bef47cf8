"""The iterative run (DESIGN sections 1-3): stages over one run directory, recorded in manifest.json.

    ingest                      corpus -> RUN/ingest/samples.parquet (N samples; their file order is
                                the initial order)
    for e in 0 .. iterations-1:
      iter_e/score              e = 0: all N with the base model; e > 0: the first W = k x update_ratio
                                ids of the current order with RUN/model/iter_{e-1} (random and
                                longest, which do not read scores, keep iteration 0's for the window)
      iter_e/select             re-order those W (picks, then others, then candidates by IFD), k picks;
                                RUN/iter_e/order.parquet is the full order after e (tail: status "tail")
      iter_e/train              one epoch over the k picks (Ray Train + DeepSpeed), resuming the
                                previous iteration's checkpoint; exports RUN/model/iter_e
    report                      RUN/report/

A stage marked done is never redone: `iterit run --resume RUN` reads the manifest and goes on from
the first stage that is not done, with the config saved in RUN/config.yaml. Every stage is a
function of its inputs and the seed, so a resumed run ends with the selections of an uninterrupted one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iterit.config import Config, save_config
from iterit.errors import IteritError
from iterit.io import atomic_open, atomic_write_text, filesystem, join, read_jsonl, read_parquet
from iterit.selection.window import reorder, select_window
from iterit.tracking import Tracker, run_key

MANIFEST_FORMAT = 1


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("iterit", "torch", "ray", "transformers", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class Manifest:
    """RUN/manifest.json: stage name -> {status, started, finished, seconds, result | error}."""

    def __init__(self, run_dir: str, data: dict):
        self.path, self.data = join(run_dir, "manifest.json"), data

    @classmethod
    def load(cls, run_dir: str) -> Manifest:
        fs, p = filesystem(join(run_dir, "manifest.json"))
        if not fs.exists(p):
            raise IteritError(
                f"{run_dir}: not an iterit run directory (no manifest.json); start one with `iterit run CONFIG`"
            )
        with fs.open(p, "r") as f:
            return cls(run_dir, json.load(f))

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def done(self, name: str) -> dict | None:
        rec = self.data["stages"].get(name)
        return rec["result"] if rec and rec["status"] == "done" else None

    def run(self, name: str, fn, log=print) -> dict:
        """Run stage `name` unless it is done; record status, timing and result (or the error)."""
        if (result := self.done(name)) is not None:
            log(f"[{name}] done earlier, skipped")
            return result
        rec = {"status": "running", "started": _now()}
        self.data["stages"][name] = rec
        self.save()
        t0 = time.perf_counter()
        try:
            result = fn()
        except BaseException as e:
            rec.update(
                status="failed",
                finished=_now(),
                seconds=round(time.perf_counter() - t0, 2),
                error=f"{type(e).__name__}: {e}",
            )
            self.save()
            raise
        rec.update(status="done", finished=_now(), seconds=round(time.perf_counter() - t0, 2), result=result)
        self.save()
        return result


# --------------------------------------------------------------------------------------------
# The stages


def _corpus(samples_path: str) -> tuple[list[str], dict[str, str]]:
    """Ids in corpus order and each sample's response text."""
    table = read_parquet(samples_path)
    ids = table.column("id").to_pylist()
    return ids, {i: m[-1]["content"] for i, m in zip(ids, table.column("messages").to_pylist())}


def _scores(path: str) -> dict[str, dict]:
    from iterit.selection.stage import read_score_rows

    return read_score_rows(path)


def _window_inputs(ids: list[str], scores: dict[str, dict], method: str) -> dict:
    """select_window's per-sample arrays for `ids` (NaN IFD for samples rejected while scoring)."""
    out = {"ifd": np.array([scores[i]["ifd"] if i in scores else np.nan for i in ids], dtype=np.float64)}
    if method == "longest":
        out["n_response_tokens"] = np.array(
            [scores[i]["n_response_tokens"] if i in scores else 0 for i in ids]
        )
    if method == "embedding":
        dim = len(next(iter(scores.values()))["embedding"])
        out["embeddings"] = np.array(
            [scores[i]["embedding"] if i in scores else np.zeros(dim) for i in ids], dtype=np.float32
        )
    return out


def write_order(out_dir: str, order: list[str], window_ifd: dict[str, float], wo, k_picked: int) -> None:
    """selection.jsonl (picks in pick order) and order.parquet (the full order; the tail marked)."""
    w = len(wo.order)
    with atomic_open(join(out_dir, "selection.jsonl"), "w") as f:
        for rank, (sid, gain) in enumerate(zip(order[:k_picked], wo.gains)):
            f.write(json.dumps({"id": sid, "rank": rank, "ifd": window_ifd[sid], "gain": gain}) + "\n")
    table = pa.table(
        {
            "id": order,
            "position": np.arange(len(order), dtype=np.int64),
            "ifd": np.array([window_ifd.get(i, np.nan) for i in order[:w]] + [np.nan] * (len(order) - w)),
            "status": list(wo.status) + ["tail"] * (len(order) - w),
        }
    )
    with atomic_open(join(out_dir, "order.parquet")) as f:
        pq.write_table(table, f)


def read_order(run_dir: str, e: int) -> list[str]:
    return read_parquet(join(run_dir, f"iter_{e}", "order.parquet")).column("id").to_pylist()


def read_picks(run_dir: str, e: int) -> list[str]:
    return [r["id"] for r in read_jsonl(join(run_dir, f"iter_{e}", "selection.jsonl"), missing_ok=False)]


def select_stage(cfg: Config, run_dir: str, e: int, samples_path: str, eos: str | None) -> dict:
    """Order the window of iteration e by the method and pick k (DESIGN section 2, Iteration)."""
    t0 = time.perf_counter()
    sel = cfg.selection
    ids, responses = _corpus(samples_path)
    n = len(ids)
    k = sel.num_selected(n)
    scores = _scores(join(run_dir, f"iter_{e}", "scores.parquet"))
    current = ids if e == 0 else read_order(run_dir, e - 1)
    w = n if e == 0 else sel.window(n)
    window = current[:w]
    arrays = _window_inputs(window, scores, sel.method)
    window_ifd = dict(zip(window, arrays["ifd"].tolist()))
    kwargs = dict(
        eos_token=eos,
        decay=sel.decay,
        seed=cfg.seed + e,
        tfidf_mode=sel.tfidf,
        n_response_tokens=arrays.get("n_response_tokens"),
        embeddings=arrays.get("embeddings"),
    )
    if e == 0:
        wo = select_window(arrays["ifd"], k, sel.method, responses=[responses[i] for i in window], **kwargs)
        order = [window[p] for p in wo.order]
    else:
        order, wo = reorder(current, window_ifd, k, sel.method, responses=responses, **kwargs)
    write_order(join(run_dir, f"iter_{e}"), order, window_ifd, wo, len(wo.picks))
    return {
        "samples": n,
        "window": w,
        "scored": int(np.isfinite(arrays["ifd"]).sum()),
        "candidates": wo.status.count("selected") + wo.status.count("candidate"),
        "k": len(wo.picks),
        "method": sel.method,
        "seconds": round(time.perf_counter() - t0, 2),
        "mean_ifd_selected": float(np.mean([window_ifd[i] for i in order[: len(wo.picks)]]))
        if wo.picks
        else None,
    }


# Methods whose order does not read the model's scores (only which samples were scored at all): later
# iterations keep iteration 0's scores for their window instead of running the model again.
SCORE_FREE = ("random", "longest")


def reuse_scores(run_dir: str, e: int, window: list[str]) -> dict:
    """iter_e/scores.parquet = iteration 0's rows of the window's ids, with no model run."""
    import pyarrow.compute as pc

    t0 = time.perf_counter()
    table = read_parquet(join(run_dir, "iter_0", "scores.parquet"))
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(window, pa.string())))
    out = join(run_dir, f"iter_{e}")
    with atomic_open(join(out, "scores.parquet")) as f:
        pq.write_table(table, f, compression="zstd")
    atomic_write_text(join(out, "rejects.jsonl"), "")  # iteration 0's rejects.jsonl holds them all
    summary = {
        "rows": len(window),
        "scored": table.num_rows,
        "rejected": 0,
        "rejected_by_reason": {},
        "tokens": 0,
        "padding_fraction": 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
        "samples_per_s": 0.0,
        "tokens_per_s": 0.0,
        "reused_from": "iter_0",
        "scores": join(out, "scores.parquet"),
        "rejects": join(out, "rejects.jsonl"),
    }
    atomic_write_text(join(out, "score_summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def score_stage(cfg: Config, run_dir: str, e: int, samples_path: str, log) -> dict:
    from iterit.scoring.pipeline import run_scoring
    from iterit.training.export import is_exported, model_dir

    if e == 0:
        return run_scoring(cfg, samples_path, join(run_dir, "iter_0"), log=log)
    window = read_order(run_dir, e - 1)[: cfg.selection.window(len(_corpus(samples_path)[0]))]
    if cfg.selection.method in SCORE_FREE:
        return reuse_scores(run_dir, e, window)
    model = model_dir(run_dir, e - 1)
    if not is_exported(model):
        raise IteritError(
            f"{model} is missing or incomplete: iteration {e - 1}'s training did not finish its export"
        )
    return run_scoring(
        cfg.model_copy(update={"base_model": model}),
        samples_path,
        join(run_dir, f"iter_{e}"),
        only_ids=window,
        log=log,
    )


def train_stage(cfg: Config, run_dir: str, e: int, samples_path: str, manifest: Manifest, log) -> dict:
    from iterit.training.trainer import train

    picks = read_picks(run_dir, e)
    # The schedule is sized by the planned k; `full` trains on every candidate, which is its k.
    k = (
        len(picks)
        if cfg.selection.method == "full"
        else cfg.selection.num_selected(manifest.done("ingest")["accepted"])
    )
    prev = manifest.done(f"iter_{e - 1}/train") if e else None
    # Ray Train resumes a fit whose (storage_path, name) it has seen: a name unique to this run
    # keeps runs that share a storage_path apart.
    out = train(
        cfg,
        run_dir,
        {e: picks},
        samples_path,
        k=k,
        resume_from=prev["checkpoint"] if prev else None,
        name=f"{run_key(run_dir)}-iter_{e}",
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


def preflight(cfg: Config, run_dir: str, log=print) -> None:
    """What the config asks for against the cluster, before any work: one clear line, not a hang."""
    import ray

    from iterit.scoring import pipeline
    from iterit.templates import load_tokenizer
    from iterit.tracking import check_available
    from iterit.training.trainer import check_shared_storage, storage_path, use_gpu

    load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)  # the model is reachable
    sc = cfg.scoring
    gpus = (
        sc.gpus_per_actor
        if sc.gpus_per_actor is not None
        else (1.0 if ray.cluster_resources().get("GPU", 0) else 0.0)
    )
    pipeline.check_pool_fits(sc, gpus, log)
    have = ray.cluster_resources()
    gpu = use_gpu(cfg)
    per = cfg.resources_per_worker or ({"GPU": 1} if gpu else {"CPU": 1})
    for res, amount in per.items():
        need, got = amount * cfg.ray_num_workers, have.get(res, 0)
        if need > got:
            msg = f"training needs {need:g} {res} ({cfg.ray_num_workers} workers x {amount:g}); the cluster has {got:g}"
            if pipeline._LOCAL_RAY:
                raise IteritError(msg + ": lower ray_num_workers or resources_per_worker")
            log(f"warning: {msg}; training waits until the autoscaler adds them")
    if cfg.use_gpu and not have.get("GPU"):
        log("warning: use_gpu is true but the cluster has no GPU yet")
    check_shared_storage(
        [storage_path(cfg, run_dir), run_dir if "://" in run_dir else os.path.abspath(run_dir)]
    )
    check_available(cfg.report_to)


def read_run_config(run_dir: str) -> Config:
    """RUN/config.yaml (local or an fsspec URI): the config a resumed run goes on with."""
    import yaml

    from iterit.config import config_from_dict

    fs, p = filesystem(join(run_dir, "config.yaml"))
    if not fs.exists(p):
        raise IteritError(f"{run_dir} has no config.yaml: it is not a run directory that can be resumed")
    with fs.open(p, "r") as f:
        return config_from_dict(yaml.safe_load(f.read()) or {}, join(run_dir, "config.yaml"))


def run(cfg: Config | None = None, resume: str | None = None, log=print) -> dict:
    """The whole loop. `cfg` starts a fresh run in cfg.output_dir; `resume` continues RUN."""
    from iterit.data import ingest
    from iterit.scoring.pipeline import ensure_ray
    from iterit.templates import load_tokenizer

    if resume:
        run_dir = resume
        manifest = Manifest.load(run_dir)
        cfg = read_run_config(run_dir)
    else:
        run_dir = cfg.output_dir
        fs, p = filesystem(join(run_dir, "manifest.json"))
        if fs.exists(p):
            raise IteritError(
                f"{run_dir} already holds a run: continue it with `iterit run --resume {run_dir}`, "
                "or set output_dir to a new directory"
            )
        save_config(cfg, join(run_dir, "config.yaml"))
        manifest = Manifest(
            run_dir,
            {
                "format": MANIFEST_FORMAT,
                "run_dir": run_dir,
                "seed": cfg.seed,
                "created": _now(),
                "iterations": cfg.iterations,
                "versions": _versions(),
                "stages": {},
            },
        )
        manifest.save()
    ensure_ray()
    preflight(cfg, run_dir, log)
    t0 = time.perf_counter()
    ing = manifest.run(
        "ingest", lambda: ingest(cfg.datasets, join(run_dir, "ingest"), cfg.system_prompt), log
    )
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
    tracker = Tracker(cfg.report_to, run_dir, cfg.model_dump(mode="json"))
    rows = []
    for e in range(cfg.iterations):
        s = manifest.run(f"iter_{e}/score", lambda: score_stage(cfg, run_dir, e, samples, log), log)
        if s.get("reused_from"):
            log(
                f"[iter_{e}/score] {s['scored']:,} of the window keep {s['reused_from']}'s scores ({cfg.selection.method} "
                "does not read them)"
            )
        else:
            log(
                f"[iter_{e}/score] {s['scored']:,} scored, {s['rejected']:,} rejected, {s['tokens_per_s']:,.0f} tokens/s"
            )
        sel = manifest.run(f"iter_{e}/select", lambda: select_stage(cfg, run_dir, e, samples, eos), log)
        log(
            f"[iter_{e}/select] {sel['k']:,} of {sel['window']:,} picked ({sel['candidates']:,} candidates) "
            f"in {sel['seconds']:.1f} s"
        )
        tr = manifest.run(
            f"iter_{e}/train", lambda: train_stage(cfg, run_dir, e, samples, manifest, log), log
        )
        if e and cfg.keep_checkpoints == "last":  # iteration e resumes from e - 1's no more: it is done
            prune_checkpoint(
                manifest.done(f"iter_{e - 1}/train")["checkpoint"], keep=tr["checkpoint"], log=log
            )
        log(
            f"[iter_{e}/train] {tr['steps']} steps, loss {tr['final_loss']:.4f}, {tr['tokens_per_s']:,.0f} tokens/s "
            f"-> {tr['model']}"
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
    from iterit.report import write_report

    rep = manifest.run("report", lambda: write_report(run_dir), log)
    tracker.close()
    return {
        "run_dir": run_dir,
        "iterations": rows,
        "report": rep["report"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
