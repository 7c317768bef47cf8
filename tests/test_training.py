"""Training: loss masks on real templates, step arithmetic, and Ray Train + DeepSpeed fits on the tiny
model (2 CPU workers, gloo): continuity across iterations, export, crash recovery, LoRA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import fit_tree

from iterit.config import config_from_dict
from iterit.rundir import RunDir
from iterit.training.examples import IGNORE, collate, steps_per_iteration, trained_tokens, training_examples

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Give the sum."},
        {"role": "assistant", "content": "The sum is two."},
    ],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is the file?"},
        {"role": "assistant", "content": "It is the data."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Then we list the number."},
    ],
]


def _trained_text(tok, ids, labels) -> list[str]:
    """Decode each contiguous run of unmasked tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("which", ["tiny_tokenizer", "smollm_tokenizer"])
def test_final_response_mask_is_the_response_and_its_end_of_turn(which, request):
    tok = request.getfixturevalue(which)
    for conv, (ids, labels) in zip(CONVERSATIONS, training_examples(tok, CONVERSATIONS, 256)):
        assert _trained_text(tok, ids, labels) == [conv[-1]["content"] + "<|im_end|>\n"]
        assert all(lab == i for i, lab in zip(ids, labels) if lab != IGNORE)


def test_all_assistant_mask_covers_every_assistant_turn(smollm_tokenizer):
    ids, labels = training_examples(smollm_tokenizer, CONVERSATIONS[1:], 256, train_on="all_assistant")[0]
    assert _trained_text(smollm_tokenizer, ids, labels) == [
        "It is the data.<|im_end|>\n",
        "Then we list the number.<|im_end|>\n",
    ]


def test_truncation_keeps_the_scoring_rule(tiny_tokenizer):
    long_prompt = [
        {"role": "user", "content": "word " * 300},
        {"role": "assistant", "content": "Short answer."},
    ]
    (rej,) = training_examples(tiny_tokenizer, [long_prompt], 64)
    assert rej.reason == "response_truncated"
    cut = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "because " * 100}]
    ((ids, labels),) = training_examples(tiny_tokenizer, [cut], 64)
    assert len(ids) == 64 and labels[-1] == ids[-1]


def test_collate_pads_and_counts():
    b = collate([[1, 2, 3], [4]], [[IGNORE, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert trained_tokens(b["labels"]) == 2  # position 0 is never a target


@pytest.mark.parametrize(
    "k,workers,micro,accum,steps",
    [(100, 1, 1, 32, 4), (96, 1, 1, 32, 3), (101, 2, 2, 4, 7), (1, 2, 1, 1, 0), (7, 2, 2, 2, 1)],
)
def test_steps_per_iteration(k, workers, micro, accum, steps):
    assert steps_per_iteration(k, workers, micro, accum) == steps


def test_deepspeed_config_stage_offload_and_json(tmp_path, tiny_model_dir):
    from iterit.errors import IteritError
    from iterit.training.trainer import deepspeed_config

    base = {
        "base_model": tiny_model_dir,
        "datasets": [{"path": "x.jsonl"}],
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 4,
    }
    ds = deepspeed_config(config_from_dict({**base, "deepspeed": 3}), workers=2, gpu=True)
    assert ds["train_batch_size"] == 16 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    off = deepspeed_config(
        config_from_dict({**base, "deepspeed": 2, "offload_optimizer": True}), 1, gpu=False
    )
    assert (
        off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        and off["optimizer"]["type"] == "AdamW"
    )
    assert off["bf16"]["enabled"] is False
    with pytest.raises(IteritError, match="offload_optimizer needs"):
        deepspeed_config(config_from_dict({**base, "deepspeed": 0, "offload_optimizer": True}), 1, gpu=False)
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7}, "train_batch_size": 999})
    )
    ds = deepspeed_config(config_from_dict({**base, "deepspeed": str(user)}), 2, gpu=False)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 5e7} and ds["train_batch_size"] == 16
    with pytest.raises(IteritError, match="ZeRO stage"):
        config_from_dict({**base, "deepspeed": 4})


def test_seeded_order_draws_from_iteration_rng():
    from iterit.config import iteration_rng
    from iterit.training.trainer import seeded_order

    ids = [f"s{i}" for i in range(50)]
    order = seeded_order(ids, 42, 1)
    assert order == [ids[i] for i in np.random.default_rng([42, 1]).permutation(50)]
    assert order == [ids[i] for i in iteration_rng(42, 1).permutation(50)]
    assert sorted(order) == sorted(ids) and order != seeded_order(ids, 42, 2) != seeded_order(ids, 43, 1)


# --------------------------------------------------------------------------------------------
# Ray Train fits


def _cfg(tiny_model_dir, run_dir, **kw):
    return config_from_dict(fit_tree(tiny_model_dir, run_dir, **kw))


def test_the_worker_job_carries_the_flat_keys_and_its_rebuild_rejects_unknown_ones(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    """Flat YAML keys -> cfg.training() -> the WorkerJob the driver sends -> its dump, rebuilt on the
    worker: the values the loop uses; an unknown, misspelt or missing key fails on the loop's first line."""
    from pydantic import ValidationError

    from iterit.training.train_loop import CRASH_ENV, WorkerJob, train_loop_per_worker
    from iterit.training.trainer import worker_job

    monkeypatch.setenv(CRASH_ENV, "/tmp/marker:3")
    cfg = _cfg(tiny_model_dir, tmp_path, checkpoint_every=2, lora_r=4, lr_scheduler="linear")
    run = RunDir(str(tmp_path))
    job = WorkerJob.model_validate(
        worker_job(cfg, run, [1, 2], k=16, gpu=False, resume_from="/ckpt").model_dump(mode="json")
    )
    t = job.training
    assert (t.micro_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (2, 2, 1e-3)
    assert (t.lr_scheduler, t.checkpoint_every, t.lora()["r"]) == ("linear", 2, 4)
    # 16 samples / 2 workers / micro 2 = 4 micro-batches = 2 steps per iteration, 3 iterations
    assert (job.total_steps, job.warmup_steps) == (6, 2)
    assert job.ds_config["train_batch_size"] == 8 and job.ds_config["zero_optimization"]["stage"] == 2
    assert (job.run, job.iterations, job.resume_from, job.crash) == (run, [1, 2], "/ckpt", "/tmp/marker:3")
    assert job.pad_id == tiny_tokenizer.pad_token_id and job.attn_implementation == "sdpa"
    assert (job.torch_threads, job.seed, job.bf16) == (1, 42, False)

    good = job.model_dump(mode="json")
    typo = {**good, "training": {**good["training"], "micro_batch_sise": 4}}
    missing = {k: v for k, v in good.items() if k != "pad_id"}
    for bad, key in [({**good, "lr": 1.0}, "lr"), (typo, "micro_batch_sise"), (missing, "pad_id")]:
        with pytest.raises(ValidationError, match=key):
            train_loop_per_worker(bad)  # fails before it touches Ray, DeepSpeed or the model


def _weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def test_two_one_iteration_fits_equal_one_run(ray_local, tiny_model_dir, train_corpus, tmp_path):
    """Continuity: the schedule and optimizer carry over, so fitting iteration by iteration gives the
    same learning-rate trace and the same weights as one fit over the two subsets."""
    from transformers import AutoModelForCausalLM

    from iterit.training.trainer import read_metrics, train

    samples, all_subsets = train_corpus
    subsets = {e: all_subsets[e] for e in range(2)}
    one = _cfg(tiny_model_dir, tmp_path / "one", iterations=2)
    whole = train(one, str(tmp_path / "one"), subsets, samples, k=16, name="one")
    split = _cfg(tiny_model_dir, tmp_path / "split", iterations=2)
    ckpt = None
    for e in range(2):
        ckpt = train(
            split,
            str(tmp_path / "split"),
            {e: subsets[e]},
            samples,
            k=16,
            resume_from=ckpt,
            name=f"split_{e}",
        )["checkpoint"]

    # 16 samples / 2 workers = 8 rows -> 4 micro-batches of 2 -> 2 steps of 2 per iteration
    assert whole["total_steps"] == 4
    trace_one = [m for e in range(2) for m in read_metrics(str(tmp_path / "one"), e)]
    trace_split = [m for e in range(2) for m in read_metrics(str(tmp_path / "split"), e)]
    assert [m["step"] for m in trace_one] == [1, 2, 3, 4] == [m["step"] for m in trace_split]
    assert [m["lr"] for m in trace_one] == pytest.approx([m["lr"] for m in trace_split], rel=1e-12)
    # warmup ceil(0.2 * 4) = 1 step (0), then cosine over the remaining 3; the rate each step applied
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * i / 3)) for i in range(3)]
    assert [m["lr"] for m in trace_one] == pytest.approx([0.0] + cosine, abs=1e-12)
    assert [m["loss"] for m in trace_one] == pytest.approx([m["loss"] for m in trace_split], rel=1e-5)
    one_run, split_run = RunDir(str(tmp_path / "one")), RunDir(str(tmp_path / "split"))
    w1, w2 = _weights(one_run.model(1)), _weights(split_run.model(1))
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-6
    # Each exported model loads with plain transformers and differs from the one before.
    prev = _weights(tiny_model_dir)
    for e in range(2):
        model = AutoModelForCausalLM.from_pretrained(split_run.model(e))
        cur = {k: v.detach() for k, v in model.state_dict().items()}
        assert max(float((cur[k] - prev[k]).abs().max()) for k in prev) > 1e-4
        prev = cur


def test_worker_crash_resumes_from_the_last_checkpoint(
    ray_local, tiny_model_dir, train_corpus, tmp_path, monkeypatch
):
    """ZeRO-3, 2 workers, a checkpoint every step; rank 0 exits at step 2 once: Ray Train restarts the
    group from the step-2... step-1 checkpoint and the iteration ends with the planned step count."""
    from iterit.training.train_loop import CRASH_ENV
    from iterit.training.trainer import read_metrics, train

    samples, subsets = train_corpus
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"{marker}:2")
    cfg = _cfg(
        tiny_model_dir,
        tmp_path / "run",
        deepspeed=3,
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        checkpoint_every=1,
        max_failures=1,
        iterations=1,
    )
    out = train(cfg, str(tmp_path / "run"), {0: subsets[0]}, samples, k=16, name="crash")
    assert marker.exists()  # it did crash
    metrics = read_metrics(str(tmp_path / "run"), 0)
    assert [m["step"] for m in metrics] == list(range(1, 9)) and out["total_steps"] == 8
    assert out["iterations"][0]["steps"] == 8
    w = _weights(RunDir(str(tmp_path / "run")).model(0))
    assert all(np.isfinite(v.float().numpy()).all() for v in w.values())


# --------------------------------------------------------------------------------------------
# Model set-up: activation checkpointing, partitioned loading


def _job(tiny_model_dir, tmp_path, **kw):
    from iterit.training.trainer import worker_job

    return worker_job(_cfg(tiny_model_dir, tmp_path, **kw), RunDir(str(tmp_path)), [0], k=16, gpu=False)


def _loss_grads_saved(model, batch):
    """(loss, {name: grad}, bytes autograd saved for the backward pass) of one forward/backward."""
    import torch

    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss.detach()), grads, sum(saved)


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_model_dir, tmp_path, lora):
    """gradient_checkpointing: true (non-reentrant) recomputes each layer in the backward pass: the
    same loss and gradients to float rounding, also with LoRA (whose dropout must recompute the same
    masks), and autograd keeps fewer bytes for the backward pass."""
    import torch

    from iterit.training.train_loop import build_model

    batch = collate(
        [np.arange(5, 45), np.arange(7, 30)], [np.arange(5, 45), np.r_[[IGNORE] * 10, np.arange(17, 30)]], 0
    )
    batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    runs = {}
    for gc in (False, True):
        job = _job(tiny_model_dir, tmp_path, lora_r=lora, lora_dropout=0.3, gradient_checkpointing=gc)
        torch.manual_seed(0)  # the same LoRA initialisation and dropout masks in both
        model = build_model(job, torch.float32)
        assert model.is_activation_checkpointing == gc
        runs[gc] = _loss_grads_saved(model, batch)
    (loss0, g0, saved0), (loss1, g1, saved1) = runs[False], runs[True]
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7) for n in g0)
    assert saved1 < 0.75 * saved0  # measured on the tiny model: full ~0.55, LoRA ~0.6


def test_zero3_init_loads_each_weight_into_its_partition(tiny_model_dir, tmp_path, monkeypatch):
    """Under ZeRO-3 with zero3_init (the default) build_model's weights are DeepSpeed partitions as they
    come out of from_pretrained (here one rank: the whole partition, but held by DeepSpeed, with no full
    tensor on the module), with the checkpoint's values; zero3_init: false loads plain full tensors. The
    HF DeepSpeed config is unset afterwards (a later from_pretrained on one rank must not partition)."""
    import socket

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from transformers.integrations import is_deepspeed_zero3_enabled

    from iterit.training.train_loop import build_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        reference = _weights(tiny_model_dir)
        model = build_model(_job(tiny_model_dir, tmp_path, deepspeed=3, ray_num_workers=1), torch.float32)
        assert not is_deepspeed_zero3_enabled()
        params = dict(model.named_parameters())
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())
        assert sum(p.ds_numel for p in params.values()) == sum(v.numel() for v in reference.values())
        with GatheredParameters(list(params.values())):
            for name, p in params.items():
                assert torch.equal(p.data, reference[name]), name
        plain = build_model(
            _job(tiny_model_dir, tmp_path, deepspeed=3, ray_num_workers=1, zero3_init=False), torch.float32
        )
        assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    finally:
        dist.destroy_process_group()


def test_partitioned_loading_trains_as_the_full_load(zero3_fit, tiny_model_dir, train_corpus, tmp_path):
    """ZeRO-3, 2 workers, fp32: weights loaded straight into the partitions (zero3_init, the default;
    the session's zero3_fit) give the loss trace and the exported weights of the full load on every
    worker, within 1e-6."""
    from iterit.training.trainer import read_metrics, train

    samples, subsets = train_corpus
    cfg = config_from_dict({**zero3_fit["tree"], "output_dir": str(tmp_path / "full"), "zero3_init": False})
    train(cfg, str(tmp_path / "full"), {0: subsets[0]}, samples, k=16, name="full")
    loss_a = [m["loss"] for m in zero3_fit["metrics"]]
    loss_b = [m["loss"] for m in read_metrics(str(tmp_path / "full"), 0)]
    w_a = _weights(RunDir(str(zero3_fit["run_dir"])).model(0))
    w_b = _weights(RunDir(str(tmp_path / "full")).model(0))
    assert len(loss_a) == 2 and loss_a == pytest.approx(loss_b, abs=1e-6)
    assert w_a.keys() == w_b.keys() and max(float((w_a[k] - w_b[k]).abs().max()) for k in w_a) < 1e-6
    base = _weights(tiny_model_dir)
    assert max(float((w_a[k] - base[k]).abs().max()) for k in w_a) > 1e-4  # it did train


def test_a_bf16_zero2_fit_exports_bf16_safetensors(ray_local, tiny_model_dir, train_corpus, tmp_path):
    """The GPU default (bf16) runs on CPU too: a bf16 ZeRO-2 fit trains (finite losses, weights moved) and
    exports bf16 safetensors that load with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from iterit.training.trainer import read_metrics, train

    samples, subsets = train_corpus
    cfg = _cfg(tiny_model_dir, tmp_path / "bf16", deepspeed=2, bf16=True, iterations=1)
    train(cfg, str(tmp_path / "bf16"), {0: subsets[0]}, samples, k=16, name="bf16")
    losses = [m["loss"] for m in read_metrics(str(tmp_path / "bf16"), 0)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    path = RunDir(str(tmp_path / "bf16")).model(0)
    w, base = _weights(path), _weights(tiny_model_dir)
    assert {v.dtype for v in w.values()} == {torch.bfloat16}
    assert max(float((w[k].float() - base[k].bfloat16().float()).abs().max()) for k in w) > 1e-3
    assert AutoModelForCausalLM.from_pretrained(path).config.dtype == torch.bfloat16


def test_lora_with_checkpointing_under_partitioned_zero3_exports_a_merged_model(
    ray_local, tiny_model_dir, train_corpus, tmp_path
):
    """LoRA adapters on a base loaded into ZeRO-3 partitions, with gradient checkpointing: the fit trains
    and rank 0's export (which loads the base model again, alone) neither hangs nor partitions; the merged
    weights moved from the base, only in the adapted modules."""
    from iterit.training.trainer import read_metrics, train

    samples, subsets = train_corpus
    cfg = _cfg(
        tiny_model_dir,
        tmp_path / "lora",
        deepspeed=3,
        iterations=1,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        gradient_checkpointing=True,
    )
    train(cfg, str(tmp_path / "lora"), {0: subsets[0]}, samples, k=16, name="lora")
    assert len(read_metrics(str(tmp_path / "lora"), 0)) == 2
    w, base = _weights(RunDir(str(tmp_path / "lora")).model(0)), _weights(tiny_model_dir)
    moved = {k for k in w if float((w[k] - base[k]).abs().max()) > 1e-6}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
