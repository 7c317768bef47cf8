"""The per-worker training loop (runs inside Ray Train workers): DeepSpeed over each iteration's shard.

    model (base HF folder) [+ LoRA] -> deepspeed.initialize(torch AdamW, schedule over ALL iterations)
    state <- ray.train.get_checkpoint()  (this fit restarted after a failure)
          or the previous iteration's checkpoint (iteration e > 0)
    for each iteration e of this fit:
        one epoch over get_dataset_shard(f"iter_{e}"), a step = grad_accum micro-batches
        (a shorter last step closes the epoch); loss = sum of token NLL / tokens of the step
        checkpoint every `checkpoint_every` steps and at the end; export HF weights to RUN/model/iter_e

The state that makes iterations one continuous run (weights, optimizer moments, scheduler, global
step) lives in the DeepSpeed checkpoint; `iterit_state.json` beside it says where in which
iteration it was taken, so a restarted worker group skips the micro-batches already done.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

STATE_FILE = "iterit_state.json"
DS_TAG = "state"
CRASH_ENV = "ITERIT_TEST_TRAIN_CRASH"  # tests: "<marker path>:<step>": rank 0 exits once at that global step


def _maybe_crash(spec: str | None, step: int, rank: int) -> None:
    if not spec or rank != 0:
        return
    marker, at = spec.rsplit(":", 1)
    if step == int(at) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def build_model(c: dict, dtype):
    """The base model (+ LoRA adapters when configured), on CPU; DeepSpeed moves it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        c["base_model"],
        dtype=dtype,
        trust_remote_code=c["trust_remote_code"],
        attn_implementation=c.get("attn_implementation") or "sdpa",
    )
    model.config.use_cache = False
    if c["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **c["lora"]))
    return model


def _micro_batches(shard, micro: int, skip: int, pad_id: int):
    """Collated micro-batches of one epoch over this worker's shard, the first `skip` left out."""
    from iterit.training.examples import collate

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


def train_loop_per_worker(c: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import get_scheduler

    from iterit.io import atomic_write_text, join
    from iterit.training.examples import trained_tokens
    from iterit.training.export import export_model

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if c.get("torch_threads"):
        torch.set_num_threads(c["torch_threads"])
    torch.manual_seed(c["seed"])
    bf16 = c["ds_config"].get("bf16", {}).get("enabled", False)
    model = build_model(c, torch.bfloat16 if bf16 else torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]

    def schedule(optimizer):
        return get_scheduler(
            c["lr_scheduler"],
            optimizer,
            num_warmup_steps=c["warmup_steps"],
            num_training_steps=c["total_steps"],
        )

    # A torch optimizer avoids DeepSpeed's JIT-built fused Adam; CPU offload needs DeepSpeed's CPU Adam
    # (configured in ds_config["optimizer"] by trainer.deepspeed_config).
    optimizer = (
        None
        if "optimizer" in c["ds_config"]
        else torch.optim.AdamW(params, lr=c["learning_rate"], weight_decay=c["weight_decay"])
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=c["ds_config"],
    )
    state = {"iteration": None, "micro_done": 0, "global_step": 0, "done": False, "metrics": []}
    ckpt = ray.train.get_checkpoint()  # set when this fit restarted after a worker failure
    if ckpt is None and c.get("resume_from"):
        ckpt = ray.train.Checkpoint(c["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=True)
            state = json.loads((Path(d) / STATE_FILE).read_text())

    def save(e: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="iterit-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                atomic_write_text(
                    join(c["run_dir"], f"iter_{e}", "train_metrics.jsonl"),
                    "".join(json.dumps(m) + "\n" for m in state["metrics"]),
                )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    from iterit.tracking import Tracker

    tracker = Tracker(c.get("report_to") if rank == 0 else None, c["run_dir"])
    device = engine.device
    for e in c["iterations"]:
        if state["iteration"] is not None and (
            state["iteration"] > e or (state["iteration"] == e and state["done"])
        ):
            continue  # finished before a restart
        if state["iteration"] != e:
            state.update(iteration=e, micro_done=0, done=False, metrics=[])
        shard = ray.train.get_dataset_shard(f"iter_{e}")
        engine.train()
        t_last = t_report = time.perf_counter()
        for step in _steps(
            _micro_batches(shard, c["micro_batch_size"], state["micro_done"], c["pad_id"]), c["grad_accum"]
        ):
            n_tok = sum(trained_tokens(b["labels"]) for b in step)
            lr = scheduler.get_last_lr()[0]  # the rate this step applies (the scheduler moves on after it)
            loss_sum = 0.0
            for i, b in enumerate(step):
                # The last micro-batch of the group closes the step, also for a shorter last group
                # (DeepSpeed reduces gradients and steps the optimizer and schedule there).
                engine.set_gradient_accumulation_boundary(i == len(step) - 1)
                batch = {k: torch.from_numpy(v).to(device) for k, v in b.items()}
                # HF's loss with num_items_in_batch = sum over the step's tokens / n_tok: the step's
                # gradient is the token mean over all its micro-batches, whatever their lengths.
                out = engine(**batch, num_items_in_batch=max(1, n_tok))
                engine.backward(out.loss, scale_wrt_gas=False)
                loss_sum += float(out.loss.detach()) * n_tok
                engine.step()
            state["micro_done"] += len(step)
            state["global_step"] += 1
            totals = torch.tensor(
                [loss_sum, float(n_tok), float(sum(int(b["attention_mask"].sum()) for b in step))],
                dtype=torch.float64,
            )
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(totals)
            now = time.perf_counter()
            m = {
                "iteration": e,
                "step": state["global_step"],
                "lr": lr,
                "loss": totals[0].item() / max(1.0, totals[1].item()),
                "tokens": int(totals[2].item()),
                "seconds": round(now - t_last, 4),
            }
            t_last = now
            state["metrics"].append(m)
            tracker.log(
                {
                    "train/loss": m["loss"],
                    "train/lr": m["lr"],
                    "train/tokens_per_s": m["tokens"] / max(1e-9, m["seconds"]),
                },
                m["step"],
            )
            if rank == 0 and (now - t_report >= c["progress_every"]):
                print(
                    f"train iteration {e} step {m['step']}/{c['total_steps']} loss {m['loss']:.4f} "
                    f"lr {m['lr']:.3g} {m['tokens'] / max(1e-9, m['seconds']):,.0f} tokens/s",
                    flush=True,
                )
                t_report = now
            _maybe_crash(c.get("crash"), state["global_step"], rank)
            if c["checkpoint_every"] and state["global_step"] % c["checkpoint_every"] == 0:
                save(e, {"iteration": e, "step": state["global_step"], "done": False})
        export_model(engine, c, e, rank)
        state["done"] = True
        save(e, {"iteration": e, "step": state["global_step"], "done": True})
    tracker.close()
