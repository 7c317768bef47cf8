"""The per-worker training loop (runs inside Ray Train workers): DeepSpeed over each iteration's shard.

    job = WorkerJob.model_validate(config)            the typed job, rebuilt on the worker's first line
    setup_model_and_optimizer   model (base HF folder) [+ LoRA] -> deepspeed.initialize(torch AdamW,
                                schedule over ALL iterations)
    load_checkpoint             this fit's last checkpoint (a restart after a failure),
                                else the previous iteration's (`resume_from`), else a fresh state
    for each iteration e of this fit:
        train_epoch             one epoch over the dataset shard `iteration_key(e)`; a step = grad_accum
                                micro-batches (a shorter last step closes the epoch); loss = sum of token
                                NLL / tokens of the step; save_checkpoint every `checkpoint_every` steps
        export_model            HF weights to RunDir.model(e)
        save_checkpoint         DeepSpeed state + iterit_state.json, train_metrics.jsonl

The state that makes iterations one continuous run (weights, optimizer moments, scheduler, global
step) lives in the DeepSpeed checkpoint; `iterit_state.json` beside it (a TrainState) says where in
which iteration it was taken, so a restarted worker group skips the micro-batches already done.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from iterit.config import TrainingConfig
from iterit.rundir import RunDir, iteration_key
from iterit.training.examples import collate, trained_tokens
from iterit.training.export import export_model

STATE_FILE = "iterit_state.json"
DS_TAG = "state"
CRASH_ENV = "ITERIT_TEST_TRAIN_CRASH"  # tests: "<marker path>:<step>": rank 0 exits once at that global step


class WorkerJob(BaseModel):
    """What one Ray Train fit's workers run: the user's training settings plus what the driver derives.
    It crosses into the workers as its dump (`train_loop_config`) and is rebuilt there first thing; an
    unknown or missing key fails before any model is loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    training: TrainingConfig
    """The config's training section (micro-batch, accumulation, optimizer, LoRA, checkpoint_every)."""
    base_model: str
    """The model being tuned (an absolute folder or a hub id): the weights every fit starts from."""
    chat_template: str | None
    """The config's chat_template, for the tokenizer exported with each model."""
    trust_remote_code: bool
    """The config's trust_remote_code, for loading base_model."""
    seed: int
    """torch's seed on every worker (LoRA initialisation, dropout)."""
    attn_implementation: str
    """Attention kernel (the config's scoring.attn_implementation: train as the model is scored)."""
    run: RunDir
    """The run directory (absolute or a URI): where metrics and exported models go."""
    iterations: list[int]
    """The iterations this fit trains, in order; iteration e's samples are the dataset iteration_key(e)."""
    ds_config: dict[str, Any]
    """The DeepSpeed config (trainer.deepspeed_config: ZeRO stage, batch sizes, precision, clipping)."""
    total_steps: int
    """Optimizer steps of the whole run: the schedule's length, which spans every iteration."""
    warmup_steps: int
    """Warmup steps of that schedule."""
    pad_id: int
    """The tokenizer's pad token id (collation pads with it; it is never attended to)."""
    resume_from: str | None = None
    """The previous iteration's checkpoint (None in a run's first fit)."""
    torch_threads: int | None = None
    """torch compute threads per worker on CPU; None: torch's default."""
    report_to: str | None = None
    """Experiment tracker that rank 0 logs each step to (the config's report_to); None: none."""
    crash: str | None = None
    """Tests only: "<marker path>:<step>" makes rank 0 exit once at that global step."""
    progress_every: float = 10.0
    """Seconds between rank 0's progress lines."""

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config.get("bf16", {}).get("enabled", False))

    @property
    def partitioned_loading(self) -> bool:
        """ZeRO-3 with zero3_init: from_pretrained loads each weight straight into its partitions."""
        return self.training.zero3_init and self.ds_config.get("zero_optimization", {}).get("stage") == 3


@dataclass
class TrainState:
    """Where the run stands, saved as iterit_state.json beside each DeepSpeed checkpoint."""

    iteration: int | None = None
    """The iteration being trained (None before the first)."""
    micro_done: int = 0
    """Micro-batches of this worker's shard of `iteration` already trained."""
    global_step: int = 0
    """Optimizer steps since the run began: the schedule's position, running on across iterations."""
    done: bool = False
    """`iteration` is trained and exported."""
    metrics: list[dict] = field(default_factory=list)
    """`iteration`'s train_metrics.jsonl lines so far, one per optimizer step."""

    def finished(self, e: int) -> bool:
        """Iteration e was trained and exported before this fit (re)started."""
        return self.iteration is not None and (self.iteration > e or (self.iteration == e and self.done))

    def begin(self, e: int) -> None:
        """Start iteration e, or go on with it when a checkpoint was taken inside it."""
        if self.iteration != e:
            self.iteration, self.micro_done, self.done, self.metrics = e, 0, False, []


def rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def log_rank0(msg: str) -> None:
    if rank() == 0:
        print(msg, flush=True)


def _maybe_crash(spec: str | None, step: int) -> None:
    if not spec or rank() != 0:
        return
    marker, at = spec.rsplit(":", 1)
    if step == int(at) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


# --------------------------------------------------------------------------------------------
# Set-up, checkpoints


def build_model(job: WorkerJob, dtype):
    """The base model (+ LoRA adapters when configured), on CPU; DeepSpeed moves it. Under ZeRO-3 with
    zero3_init the weights are partitioned as they load (a collective: every rank builds the model)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from iterit.io import local_copy

    # transformers reads a live HfDeepSpeedConfig (a weak reference) in from_pretrained and builds the
    # model under deepspeed.zero.Init; unset right after, or a later from_pretrained on rank 0 alone
    # (the LoRA export's base model) would start a collective the other ranks never join.
    ds = HfDeepSpeedConfig(copy.deepcopy(job.ds_config)) if job.partitioned_loading else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            local_copy(job.base_model),  # a folder on object storage: copied to this node first
            dtype=dtype,
            trust_remote_code=job.trust_remote_code,
            attn_implementation=job.attn_implementation,
        )
    finally:
        if ds is not None:
            unset_hf_deepspeed_config()
    model.config.use_cache = False
    if job.training.gradient_checkpointing:
        # Non-reentrant: correct with frozen inputs (LoRA) without enable_input_require_grads, and it
        # keeps the RNG state so dropout recomputes the same masks.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = job.training.lora()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model


def setup_model_and_optimizer(job: WorkerJob):
    """(DeepSpeed engine, LR scheduler): the model, AdamW and one schedule over every iteration's steps."""
    import deepspeed
    import torch
    from transformers import get_scheduler

    t = job.training
    # DeepSpeed's communicator over Ray Train's process group, before the model: zero.Init's
    # partitioned loading needs the world size and the ranks (deepspeed.initialize would do it later).
    deepspeed.init_distributed()
    model = build_model(job, torch.bfloat16 if job.bf16 else torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    # A torch optimizer avoids DeepSpeed's JIT-built fused Adam; CPU offload needs DeepSpeed's CPU Adam
    # (configured in ds_config["optimizer"] by trainer.deepspeed_config).
    optimizer = (
        None
        if "optimizer" in job.ds_config
        else torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=lambda opt: get_scheduler(
            t.lr_scheduler, opt, num_warmup_steps=job.warmup_steps, num_training_steps=job.total_steps
        ),
        config=copy.deepcopy(job.ds_config),  # DeepSpeed may fill in keys; the job stays as sent
    )
    return engine, scheduler


def load_checkpoint(engine, job: WorkerJob) -> TrainState:
    """Restore the engine from this fit's last checkpoint (Ray Train restarted the worker group after a
    failure), else from the previous iteration's; the state it was taken in (fresh without one)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and job.resume_from:
        ckpt = ray.train.Checkpoint(job.resume_from)
    if ckpt is None:
        return TrainState()
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=True)
        return TrainState(**json.loads((Path(d) / STATE_FILE).read_text()))


def save_checkpoint(engine, job: WorkerJob, state: TrainState) -> None:
    """Every rank saves its DeepSpeed shard and reports it (Ray Train merges the ranks' files into one
    checkpoint); rank 0 adds the state and rewrites the iteration's train_metrics.jsonl."""
    import ray.train

    from iterit.io import atomic_write_text

    with tempfile.TemporaryDirectory(prefix="iterit-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if rank() == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(asdict(state)))
            atomic_write_text(
                job.run.train_metrics(state.iteration),
                "".join(json.dumps(m) + "\n" for m in state.metrics),
            )
        metrics = {"iteration": state.iteration, "step": state.global_step, "done": state.done}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# --------------------------------------------------------------------------------------------
# One epoch


def _micro_batches(shard, micro: int, skip: int, pad_id: int):
    """Collated micro-batches of one epoch over this worker's shard, the first `skip` left out."""
    n = 0
    for batch in shard.iter_batches(batch_size=micro, batch_format="numpy", prefetch_batches=2):
        n += 1
        if n <= skip:
            continue
        yield collate(list(batch["input_ids"]), list(batch["labels"]), pad_id)


def _steps(batches, grad_accum: int):
    """Group micro-batches into optimizer steps (the last one may be shorter)."""
    step: list = []
    for b in batches:
        step.append(b)
        if len(step) == grad_accum:
            yield step
            step = []
    if step:
        yield step


def train_step(engine, step: list[dict]) -> tuple[float, int]:
    """One optimizer step over its micro-batches: (the step's token-mean loss, its non-pad input tokens),
    both over all workers."""
    import torch
    import torch.distributed as dist

    n_tok = sum(trained_tokens(b["labels"]) for b in step)
    loss_sum = 0.0
    for i, b in enumerate(step):
        # The last micro-batch of the group closes the step, also for a shorter last group
        # (DeepSpeed reduces gradients and steps the optimizer and schedule there).
        engine.set_gradient_accumulation_boundary(i == len(step) - 1)
        batch = {k: torch.from_numpy(v).to(engine.device) for k, v in b.items()}
        # HF's loss with num_items_in_batch = sum over the step's tokens / n_tok: the step's
        # gradient is the token mean over all its micro-batches, whatever their lengths.
        out = engine(**batch, num_items_in_batch=max(1, n_tok))
        engine.backward(out.loss, scale_wrt_gas=False)
        loss_sum += float(out.loss.detach()) * n_tok
        engine.step()
    inputs = sum(int(b["attention_mask"].sum()) for b in step)
    totals = torch.tensor([loss_sum, float(n_tok), float(inputs)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals[0].item() / max(1.0, totals[1].item()), int(totals[2].item())


def train_epoch(engine, scheduler, job: WorkerJob, state: TrainState, tracker) -> None:
    """One epoch of iteration `state.iteration` over this worker's shard, from micro-batch
    `state.micro_done` on; a metrics line per step, a checkpoint every `checkpoint_every` steps."""
    import ray.train

    t, e = job.training, state.iteration
    shard = ray.train.get_dataset_shard(iteration_key(e))
    engine.train()
    t_last = t_report = time.perf_counter()
    batches = _micro_batches(shard, t.micro_batch_size, state.micro_done, job.pad_id)
    for step in _steps(batches, t.gradient_accumulation_steps):
        lr = scheduler.get_last_lr()[0]  # the rate this step applies (the scheduler moves on after it)
        loss, tokens = train_step(engine, step)
        state.micro_done += len(step)
        state.global_step += 1
        now = time.perf_counter()
        m = {"iteration": e, "step": state.global_step, "lr": lr, "loss": loss, "tokens": tokens}
        m["seconds"] = round(now - t_last, 4)
        t_last = now
        state.metrics.append(m)
        rate = m["tokens"] / max(1e-9, m["seconds"])
        tracker.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": rate}, m["step"])
        if now - t_report >= job.progress_every:
            log_rank0(
                f"train iteration {e} step {m['step']}/{job.total_steps} loss {loss:.4f} "
                f"lr {lr:.3g} {rate:,.0f} tokens/s"
            )
            t_report = now
        _maybe_crash(job.crash, state.global_step)
        if t.checkpoint_every and state.global_step % t.checkpoint_every == 0:
            save_checkpoint(engine, job, state)


# --------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker; `config` is a WorkerJob's dump (trainer.train)."""
    job = WorkerJob.model_validate(config)
    import torch

    from iterit.tracking import Tracker

    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    torch.manual_seed(job.seed)
    engine, scheduler = setup_model_and_optimizer(job)
    state = load_checkpoint(engine, job)
    tracker = Tracker(job.report_to if rank() == 0 else None, job.run.path)
    for e in job.iterations:
        if state.finished(e):
            continue  # finished before a restart
        state.begin(e)
        train_epoch(engine, scheduler, job, state, tracker)
        export_model(engine, job, e, rank())
        state.done = True
        save_checkpoint(engine, job, state)
    tracker.close()
