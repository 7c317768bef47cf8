"""Scoring on Ray Data: samples.parquet -> template (CPU tasks) -> score (actor pool) -> scores/ parts.

    ray.data.read_parquet(samples)       [CheckpointFilter: drops ids already written, on a resume]
      .map_batches(template_rows, num_cpus=template_cpus)                       CPU tasks
      .map_batches(Scorer, compute=ActorPoolStrategy(min_size, max_size),     one model per actor,
                   num_gpus=gpus_per_actor)                                      autoscaling
      .write_parquet(OUTPUT/scores)      one part per block, written by the workers
    driver, afterwards: rejects.jsonl and score_summary.json from the parts, one part at a time

Actors that die are restarted and their batches retried (Ray Data's actor defaults); a driver killed
mid-stage resumes from the id checkpoint. Either way every id reaches exactly one part. Nothing that
grows with N passes through the driver.
"""

from __future__ import annotations

import contextlib
import json
import math
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iterit import cluster
from iterit.config import Config
from iterit.io import atomic_open, atomic_write_text, filesystem, read_parquet
from iterit.rundir import ScoreFiles, id_array, iter_scores, part_damage, score_parts
from iterit.scoring.actor import Scorer, template_rows


def with_embeddings(cfg: Config, prior: bool) -> bool:
    """Whether the scores carry embeddings: they pool the prior pass, so not without it."""
    return cfg.scoring.embeddings and prior


def scoring_dataset(
    cfg: Config,
    samples_path: str,
    only_ids: list[str] | None = None,
    actor_env: dict[str, str] | None = None,
    log=print,
    prior: bool = True,
    resuming: bool = False,
    fit_under: Config | None = None,
    source=None,
):
    """The lazy Ray Dataset of scored rows (nothing runs until it is consumed). `prior=False`: the
    conditional pass only (held-out loss), no IFD and no embeddings. `resuming`: Ray Data will add its
    checkpoint filter, an actor that holds a CPU of its own. `fit_under` (a proxy's pass): rows must
    also fit under that config's model and template (actor.template_rows). `source`: a Ray Dataset of
    samples (id, messages) to score instead of reading `samples_path` (iterit.score)."""
    import ray

    sc = cfg.scoring
    # Reading and templating are the CPU stages: both take template_cpus, so with 0 they run beside
    # actors that hold every CPU of a one-machine Ray instead of waiting for them forever.
    ds = source if source is not None else ray.data.read_parquet(samples_path, num_cpus=sc.template_cpus)
    if only_ids is not None:  # later iterations re-score a window of the corpus
        wanted = pa.array(only_ids, pa.string())
        ds = ds.map_batches(
            lambda t: t.filter(pc.is_in(t.column("id"), value_set=wanted)),
            batch_format="pyarrow",
            num_cpus=sc.template_cpus,
        )
    # A pool actor takes whole blocks, and a Parquet row group (4,096 rows) or a small file is one
    # block: without this split one actor scores it all while the others idle. Blocks of batch_size
    # rows spread the work over every actor (and templating over every CPU).
    ds = ds.repartition(target_num_rows_per_block=sc.batch_size)
    ds = ds.map_batches(
        template_rows,
        batch_format="pyarrow",
        batch_size=sc.batch_size,
        num_cpus=sc.template_cpus,
        fn_kwargs=dict(cfg=cfg, fit_under=fit_under),
    )
    gpus = cluster.scoring_gpus(sc)
    cluster.check_pool_fits(sc, gpus, log, extra_cpus=1.0 if resuming else 0.0)
    # Ray's default queues 4 batches per actor: the first actor up would take them all while the others
    # load their model. One (CPU) or two (GPU, to hide the transfer) keep them even. A pool that can
    # grow needs enough: Ray Data adds an actor only once the batches in flight per actor reach its
    # upscaling threshold (1.75 in Ray 2.60), which one per actor never does.
    in_flight = 2 if gpus > 0 else 1
    if sc.max_actors > sc.min_actors:
        threshold = ray.data.DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
        in_flight = max(in_flight, math.ceil(threshold))
    # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1 by default: a dead actor is
    # restarted and its batch retried (the crash test holds it to that).
    return ds.map_batches(
        Scorer,
        batch_format="pyarrow",
        batch_size=sc.batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=sc.min_actors, max_size=sc.max_actors, max_tasks_in_flight_per_actor=in_flight
        ),
        num_gpus=gpus,
        num_cpus=sc.cpus_per_actor,
        resources=sc.resources_per_actor,  # custom resources pin the actors to the nodes that have them
        fn_constructor_kwargs=dict(cfg=cfg, prior=prior, embeddings=with_embeddings(cfg, prior)),
        runtime_env={"env_vars": dict(actor_env)} if actor_env else None,
    )


def run_scoring(
    cfg: Config,
    samples_path: str,
    output_dir: str,
    only_ids: list[str] | None = None,
    actor_env: dict[str, str] | None = None,
    rejects_prefix: str | None = None,
    log=print,
    prior: bool = True,
    fresh: bool = False,
    fit_under: Config | None = None,
) -> dict:
    """Score every sample (or `only_ids`) into OUTPUT (rundir.ScoreFiles): the cluster writes the parts
    of OUTPUT/scores/; rejects.jsonl and score_summary.json are then built from them, part by part.

    A stage stopped halfway (driver, worker or node killed) resumes when run again: Ray Data's id
    checkpoint filters out the ids already written, so each id lands in exactly one part. A finished
    folder is only summarised again. `fresh`: delete what an earlier attempt left and score everything.
    `rejects_prefix`: a rejects.jsonl (from ingest) copied first, so one file holds every reject.
    `prior=False`: the conditional pass only; ifd and loss_prior are NaN, no embedding column.
    `fit_under`: a proxy's pass (cfg = Config.proxy()): rows must also fit the base model's template.
    """
    # Ray's workers run in other directories (and Ray Data's checkpoint takes only absolute paths):
    # a relative run directory (`make demo`'s runs/demo) would land elsewhere, or fail.
    output_dir, samples_path = cluster.absolute(output_dir), cluster.absolute(samples_path)
    files = ScoreFiles(output_dir)
    fs, scores = filesystem(files.scores)
    _, checkpoint = filesystem(files.checkpoint)
    if fresh:
        for p in (scores, checkpoint):
            if fs.exists(p):
                fs.rm(p, recursive=True)
    before = set(score_parts(files.scores))
    damaged = []
    for part in sorted(before):  # a part that does not read is never trusted: removed, its ids redone
        if why := part_damage(part):
            log(f"  {why}; its rows are scored again")
            damaged.append(part)
    if damaged:
        only_ids = ids_to_rescore(files, damaged, samples_path, only_ids, log)
        before -= set(damaged)
    t0 = time.perf_counter()
    if (before and not fs.exists(checkpoint) and not damaged) or (damaged and not only_ids):
        log(f"  {files.scores} is complete (an earlier attempt finished it): summarising it")
    else:
        if before:
            log(f"  resuming {files.scores}: the ids of its {len(before):,} parts are not scored again")
        fs.makedirs(checkpoint, exist_ok=True)  # marks an attempt under way; Ray Data deletes it at the end
        from iterit.progress import scoring_progress

        if only_ids is not None:
            total = len(only_ids)
        else:
            sfs, sp = filesystem(samples_path)
            with sfs.open(sp, "rb") as f:
                total = pq.ParquetFile(f).metadata.num_rows
        with id_checkpoint(files):
            ds = scoring_dataset(
                cfg,
                samples_path,
                only_ids,
                actor_env,
                log,
                prior=prior,
                resuming=bool(before),
                fit_under=fit_under,
            )
            with scoring_progress(files.scores, total, log=log):  # samples, tokens/s, ETA while it runs
                ds.write_parquet(files.scores)
    seconds = time.perf_counter() - t0
    summary = summarise_parts(files, before, rejects_prefix)
    summary.update(
        seconds=round(seconds, 2),
        samples_per_s=round(summary["scored_rows"] / seconds, 2),
        tokens_per_s=round(summary["tokens_this_attempt"] / seconds, 1),
        scores=files.scores,
        rejects=files.rejects,
    )
    atomic_write_text(files.summary, json.dumps(summary, indent=2) + "\n")
    if not summary["scored"]:  # a chat template that refused most rows: one line with the cause and the fix
        from iterit.templates import check_template_failures, template_failures

        check_template_failures(summary["rows"], 0, template_failures(files.rejects), cfg.system_prompt)
    return summary


def ids_to_rescore(files: ScoreFiles, damaged: list[str], samples_path: str, only_ids, log) -> list[str]:
    """After damaged parts: delete them and Ray Data's id checkpoint (it may list their ids as written),
    and return the ids of the stage (`only_ids`, or every sample) that no readable part holds. The next
    attempt scores those into the same folder, so every id is again in exactly one part. The only place
    the driver holds the stage's ids: a repair, not the normal path."""
    fs, _ = filesystem(files.scores)
    for part in damaged:
        fs.rm(filesystem(part)[1])
    _, checkpoint = filesystem(files.checkpoint)
    if fs.exists(checkpoint):
        fs.rm(checkpoint, recursive=True)
    wanted = (
        id_array(only_ids)
        if only_ids is not None
        else read_parquet(samples_path, columns=["id"]).column("id")
    )
    present = [t.column("id") for t in iter_scores(files.scores, ["id"], scored_only=False)]
    held = pa.chunked_array(present, pa.string())
    missing = pc.filter(wanted, pc.invert(pc.is_in(wanted, value_set=held.combine_chunks())))
    log(f"  {len(damaged):,} damaged part(s) removed: {len(missing):,} ids to score again")
    return missing.to_pylist()


@contextlib.contextmanager
def id_checkpoint(files: ScoreFiles):
    """Datasets created inside carry Ray Data's id checkpoint of `files` (Ray copies the DataContext
    when a dataset is created): on their write, a part counts once its ids are committed (two-phase),
    and a resumed write loads the committed ids, filters them out right after the read and deletes the
    parts a killed attempt left uncommitted."""
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    ctx = DataContext.get_current()
    previous = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=files.checkpoint)
    try:
        yield
    finally:
        ctx.checkpoint_config = previous


def summarise_parts(files: ScoreFiles, before: set[str], rejects_prefix: str | None) -> dict:
    """Counts, token totals and rejects.jsonl from the parts, one part in memory at a time. Rows of parts
    that existed before this attempt count as resumed, the others as scored by it."""
    rows = scored = real = 0
    computed = 0.0
    resumed_rows = this_attempt = tokens_this_attempt = 0
    by_reason: dict[str, int] = {}
    columns = ["id", "source", "row", "reject", "detail", "real_tokens", "computed_tokens"]
    with atomic_open(files.rejects, "w") as out:
        if rejects_prefix:
            fs, p = filesystem(rejects_prefix)
            with fs.open(p, "r", encoding="utf-8") as f:
                for line in f:
                    out.write(line)
        for part in score_parts(files.scores):
            (t,) = iter_scores(part, columns, scored_only=False)
            ok = pc.equal(t.column("reject"), "")
            good, bad = t.filter(ok), t.filter(pc.invert(ok))
            rows += t.num_rows
            scored += good.num_rows
            tokens = int(pc.sum(good.column("real_tokens")).as_py() or 0)
            real += tokens
            computed += float(pc.sum(good.column("computed_tokens")).as_py() or 0.0)
            if part in before:
                resumed_rows += t.num_rows
            else:
                this_attempt += t.num_rows
                tokens_this_attempt += tokens
            for r in bad.select(["source", "row", "id", "reject", "detail"]).to_pylist():
                by_reason[r["reject"]] = by_reason.get(r["reject"], 0) + 1
                r["reason"] = r.pop("reject")
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {
        "rows": rows,
        "scored": scored,
        "rejected": rows - scored,
        "rejected_by_reason": by_reason,
        "tokens": real,
        "padding_fraction": round(1 - real / computed, 4) if computed else 0.0,
        "resumed_rows": resumed_rows,
        "scored_rows": this_attempt,
        "tokens_this_attempt": tokens_this_attempt,
    }
