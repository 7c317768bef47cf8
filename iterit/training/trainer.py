"""Training on Ray Train: the selected samples -> tokenised Ray Datasets -> TorchTrainer + DeepSpeed.

    train(cfg, run_dir, iterations=[e], subsets={e: ids}, ...)
        ray.data.from_arrow(subset in a seeded order).map_batches(tokenise)    CPU tasks
        TorchTrainer(train_loop_per_worker, ScalingConfig(ray_num_workers, use_gpu, resources_per_worker),
                     RunConfig(name, storage_path, FailureConfig(max_failures)))
        -> checkpoint (DeepSpeed state: resumes the next iteration), RUN/model/iter_e, train_metrics.jsonl

One learning-rate schedule spans every iteration: the driver computes the total optimizer steps of
the whole run and each fit resumes model, optimizer, scheduler and step from the previous one.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iterit.config import Config
from iterit.errors import IteritError
from iterit.io import filesystem, join, read_jsonl, read_parquet
from iterit.training.examples import steps_per_iteration, training_examples, warmup_steps
from iterit.training.train_loop import CRASH_ENV, train_loop_per_worker

TRAIN_SCHEMA = pa.schema(
    [("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
)


def use_gpu(cfg: Config) -> bool:
    import ray

    return cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0


def deepspeed_config(cfg: Config, workers: int, gpu: bool) -> dict:
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
    bf16 = gpu if cfg.bf16 == "auto" else bool(cfg.bf16)
    ds.update(
        {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * workers,
            "gradient_clipping": cfg.max_grad_norm,
            "bf16": {"enabled": bf16},
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
    perm = np.random.default_rng([seed, iteration]).permutation(len(ids))
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
    from iterit.scoring.actor import _tokenizer

    tok = _tokenizer(model, chat_template, trust_remote_code)
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


def storage_path(cfg: Config, run_dir: str) -> str:
    path = cfg.storage_path or join(run_dir, "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def check_shared_storage(paths: list[str]) -> None:
    """Every alive node must see local paths (workers write checkpoints, models and metrics there):
    a multi-node cluster needs them on shared storage (NFS at the same path) or an s3:// / gs:// URI."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = [p for p in paths if "://" not in p]
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not local or len(nodes) < 2:
        return
    markers = [os.path.join(p, f".iterit-visible-{os.getpid()}") for p in local]
    for p, m in zip(local, markers):
        os.makedirs(p, exist_ok=True)
        with open(m, "w") as f:
            f.write("ok")

    exists = ray.remote(num_cpus=0)(_exists)
    try:
        checks = {
            n["NodeManagerAddress"]: ray.get(
                exists.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(markers)
            )
            for n in nodes
        }
    finally:
        for m in markers:
            os.remove(m)
    for node, seen in checks.items():
        for p, ok in zip(local, seen):
            if not ok:
                raise IteritError(
                    f"{p} is not visible from node {node}: multi-node training writes checkpoints and models "
                    "there from every node; put output_dir / storage_path on shared storage (NFS mounted at the "
                    "same path on every node) or an s3:// / gs:// URI"
                )


def _exists(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def read_metrics(run_dir: str, e: int) -> list[dict]:
    return read_jsonl(join(run_dir, f"iter_{e}", "train_metrics.jsonl"))


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

    from iterit.templates import load_tokenizer

    # Workers run elsewhere (another directory, another node): every local path goes absolute.
    run_dir = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    samples_path = samples_path if "://" in samples_path else os.path.abspath(samples_path)
    if os.path.isdir(cfg.base_model):
        cfg = cfg.model_copy(update={"base_model": os.path.abspath(cfg.base_model)})
    gpu = use_gpu(cfg)
    workers = cfg.ray_num_workers
    storage = storage_path(cfg, run_dir)
    check_shared_storage([storage, run_dir])
    iterations = sorted(subsets)
    steps_total = total_steps(cfg, k, workers)
    tok = load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)
    lora = None
    if cfg.lora_r:
        targets = cfg.lora_target_modules
        lora = {
            "r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
        }
    loop_config = {
        "base_model": cfg.base_model,
        "trust_remote_code": cfg.trust_remote_code,
        "chat_template": cfg.chat_template,
        "attn_implementation": cfg.scoring.attn_implementation,
        "lora": lora,
        "lora_export": cfg.lora_export,
        "ds_config": deepspeed_config(cfg, workers, gpu),
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "lr_scheduler": cfg.lr_scheduler,
        "total_steps": steps_total,
        "warmup_steps": warmup_steps(steps_total, cfg.warmup_ratio),
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum": cfg.gradient_accumulation_steps,
        "checkpoint_every": cfg.checkpoint_every,
        "iterations": iterations,
        "run_dir": run_dir,
        "seed": cfg.seed,
        "pad_id": tok.pad_token_id,
        "resume_from": resume_from,
        "progress_every": 10.0,
        "torch_threads": None if gpu else cfg.scoring.torch_threads,
        "report_to": cfg.report_to,
    }
    if os.environ.get(CRASH_ENV):  # tests: forwarded to the workers, whose environment is Ray's
        loop_config["crash"] = os.environ[CRASH_ENV]
    resources = cfg.resources_per_worker or ({"CPU": 1} if not gpu else None)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name or f"train_iter_{iterations[0]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={f"iter_{e}": training_dataset(cfg, samples_path, subsets[e], e) for e in iterations},
        dataset_config=DataConfig(execution_options=_ordered()),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise IteritError(f"training failed: {result.error}")
    summaries = {}
    for e in iterations:
        m = read_metrics(run_dir, e)
        tokens, busy = sum(x["tokens"] for x in m), sum(x["seconds"] for x in m)
        summaries[e] = {
            "steps": len(m),
            "tokens": tokens,
            "train_seconds": round(busy, 2),
            "tokens_per_s": round(tokens / busy, 1) if busy else 0.0,
            "final_loss": m[-1]["loss"] if m else None,
            "mean_loss": float(np.mean([x["loss"] for x in m])) if m else None,
            "model": join(run_dir, "model", f"iter_{e}"),
        }
    return {
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "fit_seconds": round(seconds, 2),
        "total_steps": steps_total,
        "iterations": summaries,
    }


def _ordered():
    from ray.data import ExecutionOptions

    opts = ExecutionOptions()
    opts.preserve_order = True  # the seeded order reaches the workers as it was drawn
    return opts
