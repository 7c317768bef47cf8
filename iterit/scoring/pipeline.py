"""Scoring on Ray Data: samples.parquet -> template (CPU tasks) -> score (actor pool) -> scores.parquet.

    ray.data.read_parquet(samples)
      .map_batches(template_rows, num_cpus=template_cpus)                       CPU tasks
      .map_batches(Scorer, compute=ActorPoolStrategy(min_size, max_size),     one model per actor,
                   num_gpus=gpus_per_actor)                                      autoscaling
      -> driver: iter_batches -> scores.parquet (streamed) + rejects.jsonl

Actors that die are restarted and their batches retried (Ray Data's actor defaults), so every id
reaches the writer exactly once.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iterit import cluster
from iterit.config import Config
from iterit.io import atomic_open, atomic_write_text, read_parquet
from iterit.rundir import ScoreFiles
from iterit.scoring.actor import Scorer, template_rows

SCORES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("ifd", pa.float64()),
        ("loss_cond", pa.float64()),
        ("loss_prior", pa.float64()),
        ("n_prompt_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
    ]
)
EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float32()))


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
):
    """The lazy Ray Dataset of scored rows (nothing runs until it is iterated). `prior=False`: the
    conditional pass only (held-out loss), no IFD and no embeddings."""
    import ray

    sc = cfg.scoring
    # Reading and templating are the CPU stages: both take template_cpus, so with 0 they run beside
    # actors that hold every CPU of a one-machine Ray instead of waiting for them forever.
    ds = ray.data.read_parquet(samples_path, num_cpus=sc.template_cpus)
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
        fn_kwargs=dict(cfg=cfg),
    )
    gpus = cluster.scoring_gpus(sc)
    cluster.check_pool_fits(sc, gpus, log)
    # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1 by default: a dead actor is
    # restarted and its batch retried (the crash test holds it to that).
    return ds.map_batches(
        Scorer,
        batch_format="pyarrow",
        batch_size=sc.batch_size,
        # Ray's default queues 4 batches per actor: the first actor up would take them all while
        # the others load their model. One (CPU) or two (GPU, to hide the transfer) keep them even.
        compute=ray.data.ActorPoolStrategy(
            min_size=sc.min_actors, max_size=sc.max_actors, max_tasks_in_flight_per_actor=2 if gpus > 0 else 1
        ),
        num_gpus=gpus,
        num_cpus=sc.cpus_per_actor,
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
    progress_every: float = 10.0,
    prior: bool = True,
) -> dict:
    """Score every sample (or `only_ids`) into OUTPUT (rundir.ScoreFiles: scores.parquet, rejects.jsonl,
    score_summary.json).

    `rejects_prefix`: a rejects.jsonl (from ingest) copied first, so one file holds every reject.
    `prior=False`: the conditional pass only; ifd and loss_prior are NaN, no embedding column.
    """
    ds = scoring_dataset(cfg, samples_path, only_ids, actor_env, log, prior=prior)
    schema = SCORES_SCHEMA.append(EMBEDDING_FIELD) if with_embeddings(cfg, prior) else SCORES_SCHEMA
    t0 = last = time.perf_counter()
    n_scored = n_rows = real = 0
    computed = 0.0
    by_reason: dict[str, int] = {}
    files = ScoreFiles(output_dir)
    with (
        atomic_open(files.scores) as fout,
        atomic_open(files.rejects, "w") as frej,
        pq.ParquetWriter(fout, schema, compression="zstd") as writer,
    ):
        if rejects_prefix:
            from iterit.io import filesystem

            fs, p = filesystem(rejects_prefix)
            with fs.open(p, "r", encoding="utf-8") as f:
                for line in f:
                    frej.write(line)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            n_rows += batch.num_rows
            rej = batch.column("reject").to_pylist()
            ok = pa.array([not r for r in rej])
            for i, r in enumerate(rej):
                if r:
                    by_reason[r] = by_reason.get(r, 0) + 1
                    frej.write(
                        json.dumps(
                            {
                                "source": batch.column("source")[i].as_py(),
                                "row": batch.column("row")[i].as_py(),
                                "id": batch.column("id")[i].as_py(),
                                "reason": r,
                                "detail": batch.column("detail")[i].as_py(),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
            good = batch.filter(ok)
            if good.num_rows:
                cols = [good.column(f.name).cast(f.type) for f in schema]
                writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            n_scored += good.num_rows
            real += int(pc.sum(good.column("real_tokens")).as_py() or 0)
            computed += float(np.sum(good.column("computed_tokens")))
            now = time.perf_counter()
            if now - last >= progress_every:
                el = now - t0
                rates = f"({n_scored / el:,.1f}/s), {real:,} tokens ({real / el:,.0f}/s)"
                log(f"  scored {n_scored:,} samples {rates}")
                last = now
    seconds = time.perf_counter() - t0
    summary = {
        "rows": n_rows,
        "scored": n_scored,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": by_reason,
        "tokens": real,
        "padding_fraction": round(1 - real / computed, 4) if computed else 0.0,
        "seconds": round(seconds, 2),
        "samples_per_s": round(n_scored / seconds, 2),
        "tokens_per_s": round(real / seconds, 1),
        "scores": files.scores,
        "rejects": files.rejects,
    }
    atomic_write_text(files.summary, json.dumps(summary, indent=2) + "\n")
    if not n_scored:  # a chat template that refused most rows: one line with the cause and the fix
        from iterit.templates import check_template_failures, template_failures

        check_template_failures(n_rows, n_scored, template_failures(files.rejects), cfg.system_prompt)
    return summary


def read_scores(path: str) -> pa.Table:
    return read_parquet(path)
