"""Training on Ray Train: the selected samples -> tokenised Ray Datasets -> TorchTrainer + DeepSpeed.

    train(cfg, run_dir, subsets={e: ids}, samples_path, k=...)
        ray.data.from_arrow(subset in a seeded order).map_batches(tokenise_rows)    CPU tasks
        worker_job(cfg, ...) -> WorkerJob: cfg.training() + the DeepSpeed config, schedule length, pad id
        TorchTrainer(train_loop_per_worker, train_loop_config=job's dump,
                     ScalingConfig(ray_num_workers, use_gpu, resources_per_worker),
                     RunConfig(name, storage_path, FailureConfig(max_failures)),
                     datasets={iteration_key(e): ...})
        -> checkpoint (DeepSpeed state: resumes the next iteration), RunDir.model(e), train_metrics.jsonl

One learning-rate schedule spans every iteration: the driver computes the total optimizer steps of
the whole run and each fit resumes model, optimizer, scheduler and step from the previous one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iterit.cluster import absolute, check_shared_storage, use_gpu, worker_resources
from iterit.config import Config, TrainingConfig, iteration_rng
from iterit.errors import IteritError
from iterit.io import filesystem, read_jsonl, read_parquet
from iterit.rundir import RunDir, iteration_key
from iterit.training.examples import steps_per_iteration, training_examples, warmup_steps
from iterit.training.train_loop import CRASH_ENV, WorkerJob, train_loop_per_worker

TRAIN_SCHEMA = pa.schema(
    [("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
)


def deepspeed_config(cfg: TrainingConfig, workers: int, gpu: bool) -> dict:
    """The DeepSpeed config: a ZeRO stage (or the user's JSON) with iterit's batch, precision and clipping."""
    if isinstance(cfg.deepspeed, str):
        fs, p = filesystem(cfg.deepspeed)
        try:
            with fs.open(p, "r") as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise IteritError(f"deepspeed: cannot read the JSON config {cfg.deepspeed}: {e}") from None
    else:
        ds = {"zero_optimization": {"stage": cfg.deepspeed}}
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    ds.update(
        {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * workers,
            "gradient_clipping": cfg.max_grad_norm,
            "bf16": {"enabled": cfg.bf16_on(gpu)},
            "zero_allow_untested_optimizer": True,  # a torch AdamW: no JIT-built fused Adam
            "steps_per_print": 10**9,
        }
    )
    if zero.get("stage", 0) == 3:  # export gathers the 16-bit weights on rank 0
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if cfg.offload_optimizer:
        if zero.get("stage", 0) < 2:
            raise IteritError("offload_optimizer needs deepspeed: 2 or 3 (ZeRO-Offload)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
        # ZeRO-Offload runs DeepSpeed's CPU Adam, so the optimizer is configured here, not in torch.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        }
    return ds


def total_steps(cfg: Config, k: int, workers: int | None = None) -> int:
    """Optimizer steps of the whole run: `iterations` epochs over k samples each."""
    per = steps_per_iteration(
        k, workers or cfg.ray_num_workers, cfg.micro_batch_size, cfg.gradient_accumulation_steps
    )
    return per * cfg.iterations


def seeded_order(ids: list[str], seed: int, iteration: int) -> list[str]:
    """The training order of one iteration: a permutation seeded by (seed, iteration)."""
    perm = iteration_rng(seed, iteration).permutation(len(ids))
    return [ids[i] for i in perm]


def tokenise_rows(
    batch: pa.Table,
    *,
    model: str,
    chat_template: str | None,
    trust_remote_code: bool,
    max_length: int,
    train_on: str,
) -> pa.Table:
    from iterit.errors import RowError
    from iterit.templates import cached_tokenizer

    tok = cached_tokenizer(model, chat_template, trust_remote_code)
    ids, inputs, labels = batch.column("id").to_pylist(), [], []
    for sid, ex in zip(
        ids, training_examples(tok, batch.column("messages").to_pylist(), max_length, train_on)
    ):
        if isinstance(ex, RowError):  # selected samples were scored with the same template and length
            raise IteritError(
                f"sample {sid}: {ex.reason} ({ex.detail}); was it scored with another sequence_len?"
            )
        inputs.append(ex[0])
        labels.append(ex[1])
    return pa.table({"id": ids, "input_ids": inputs, "labels": labels}, schema=TRAIN_SCHEMA)


def training_dataset(cfg: Config, samples_path: str, ids: list[str], iteration: int):
    """The iteration's samples as a Ray Dataset of token ids and labels, in the seeded order."""
    import ray

    table = read_parquet(samples_path).select(["id", "messages"])
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(ids, pa.string())))
    where = {sid: i for i, sid in enumerate(table.column("id").to_pylist())}
    missing = [sid for sid in ids if sid not in where]
    if missing:
        raise IteritError(f"{len(missing)} selected ids are not in {samples_path} (first: {missing[0]})")
    table = table.take(pa.array([where[sid] for sid in seeded_order(ids, cfg.seed, iteration)]))
    return ray.data.from_arrow(table).map_batches(
        tokenise_rows,
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=cfg.scoring.template_cpus,
        fn_kwargs=dict(
            model=cfg.base_model,
            chat_template=cfg.chat_template,
            trust_remote_code=cfg.trust_remote_code,
            max_length=cfg.sequence_len,
            train_on=cfg.train_on,
        ),
    )


def checkpoint_uri(path: str, storage: str) -> str:
    """A checkpoint's path as a URI again: Ray Train gives it inside its storage's filesystem, without
    the scheme (`bucket/runs/x/...` for s3://bucket/runs/x), which the next iteration's
    ray.train.Checkpoint(path) and the pruning would read as a local path (found by the S3 tests)."""
    if "://" in storage and "://" not in path:
        return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


def storage_path(cfg: Config, run_dir: str) -> str:
    """Where Ray Train keeps this run's checkpoints: storage_path, else RUN/checkpoints (absolute)."""
    return absolute(cfg.storage_path or RunDir(run_dir).checkpoints)


def read_metrics(run_dir: str, e: int) -> list[dict]:
    return read_jsonl(RunDir(run_dir).train_metrics(e))


def worker_job(
    cfg: Config, run: RunDir, iterations: list[int], *, k: int, gpu: bool, resume_from: str | None = None
) -> WorkerJob:
    """What the workers of one fit run: the config's training section and what the driver derives from
    the whole config (DeepSpeed config, schedule length, pad id, attention kernel, threads)."""
    from iterit.templates import cached_tokenizer

    steps = total_steps(cfg, k)
    return WorkerJob(
        training=cfg.training(),
        base_model=cfg.base_model,
        chat_template=cfg.chat_template,
        trust_remote_code=cfg.trust_remote_code,
        seed=cfg.seed,
        attn_implementation=cfg.scoring.attn_implementation,
        run=run,
        iterations=iterations,
        ds_config=deepspeed_config(cfg, cfg.ray_num_workers, gpu),
        total_steps=steps,
        warmup_steps=warmup_steps(steps, cfg.warmup_ratio),
        pad_id=cached_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code).pad_token_id,
        resume_from=resume_from,
        torch_threads=None if gpu else cfg.scoring.torch_threads,
        report_to=cfg.report_to,
        # tests: forwarded to the workers, whose environment is Ray's
        crash=os.environ.get(CRASH_ENV) or None,
    )


def iteration_summary(run: RunDir, e: int) -> dict:
    """Iteration e's training in numbers, from its train_metrics.jsonl."""
    m = read_metrics(run.path, e)
    tokens, busy = sum(x["tokens"] for x in m), sum(x["seconds"] for x in m)
    return {
        "steps": len(m),
        "tokens": tokens,
        "train_seconds": round(busy, 2),
        "tokens_per_s": round(tokens / busy, 1) if busy else 0.0,
        "final_loss": m[-1]["loss"] if m else None,
        "mean_loss": float(np.mean([x["loss"] for x in m])) if m else None,
        "model": run.model(e),
    }


def memory_preflight(cfg: Config, gpu: bool, log=print) -> None:
    """Log the per-GPU memory estimate of this fit; on GPUs, one error line when it cannot fit (before
    any worker loads a weight). A model config the driver cannot read skips it with a line: the workers
    may reach what the driver cannot (a gated hub model, a node-local cache)."""
    from iterit.cluster import gpu_memory_bytes
    from iterit.training.memory import check_fits, estimate_for

    try:
        est = estimate_for(cfg, gpu)
    except IteritError as e:
        log(f"memory preflight skipped: {e}")
        return
    log(est.line() + ("" if gpu else " (training on CPU: not checked)"))
    if gpu:
        total = gpu_memory_bytes()
        if total is None:
            log("memory preflight: no GPU answered in 60 s (autoscaling?); not checked")
        else:
            check_fits(est, total, cfg)


def train(
    cfg: Config,
    run_dir: str,
    subsets: dict[int, list[str]],
    samples_path: str,
    *,
    k: int,
    resume_from: str | None = None,
    name: str | None = None,
    log=print,
) -> dict:
    """Train one epoch per iteration in `subsets` (iteration -> selected ids) in one Ray Train fit.

    `k` sizes the schedule (total steps = iterations x steps per epoch of k samples); `resume_from`
    is the checkpoint of the previous iteration (None in iteration 0). Returns the fit's checkpoint
    path and per-iteration training summaries."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Workers run elsewhere (another directory, another node): every local path goes absolute.
    run = RunDir(absolute(run_dir))
    samples_path = absolute(samples_path)
    if os.path.isdir(cfg.base_model):
        cfg = cfg.model_copy(update={"base_model": os.path.abspath(cfg.base_model)})
    gpu = use_gpu(cfg.use_gpu)
    storage = storage_path(cfg, run.path)
    check_shared_storage([storage, run.path])
    memory_preflight(cfg, gpu, log)
    iterations = sorted(subsets)
    job = worker_job(cfg, run, iterations, k=k, gpu=gpu, resume_from=resume_from)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(mode="json"),  # rebuilt into a WorkerJob on each worker
        scaling_config=ScalingConfig(
            num_workers=cfg.ray_num_workers,
            use_gpu=gpu,
            resources_per_worker=worker_resources(cfg.resources_per_worker, gpu),
        ),
        run_config=RunConfig(
            name=name or f"train_{iteration_key(iterations[0])}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={iteration_key(e): training_dataset(cfg, samples_path, subsets[e], e) for e in iterations},
        dataset_config=DataConfig(execution_options=_ordered()),
    )
    from iterit.progress import training_progress

    t0 = time.perf_counter()
    live = (  # one iteration's fit (the loop's): its steps, loss and tokens/s while it runs
        training_progress(run.train_metrics(iterations[0]), job.total_steps // cfg.iterations, log=log)
        if len(iterations) == 1
        else contextlib.nullcontext()
    )
    with live:
        result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise IteritError(f"training failed: {result.error}")
    return {
        "checkpoint": checkpoint_uri(result.checkpoint.path, storage) if result.checkpoint else None,
        "fit_seconds": round(seconds, 2),
        "total_steps": job.total_steps,
        "iterations": {e: iteration_summary(run, e) for e in iterations},
    }


def _ordered():
    from ray.data import ExecutionOptions

    opts = ExecutionOptions()
    opts.preserve_order = True  # the seeded order reaches the workers as it was drawn
    return opts
