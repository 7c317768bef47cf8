"""The memory preflight against numbers computed by hand for Llama-3-8B and -70B shapes, DeepSpeed's own
estimators, and the one-line error naming the setting to change."""

from __future__ import annotations

import pytest

from iterit.config import config_from_dict
from iterit.errors import IteritError
from iterit.training.memory import (
    KNOWN_SHAPES,
    GiB,
    check_fits,
    estimate,
    estimate_for,
    lora_params,
    model_shape,
    read_model_shape,
)


def llama_params(vocab, hidden, inter, layers, heads, kv_heads) -> int:
    """Llama's parameters by hand: embeddings and an untied head, per layer q/o (h x h), k/v (h x kv),
    the SwiGLU MLP (3 x h x i) and two RMSNorms, and the final norm."""
    kv = hidden // heads * kv_heads
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return 2 * vocab * hidden + layers * layer + hidden


@pytest.fixture(scope="module")
def llama8b():
    return read_model_shape("meta-llama/Meta-Llama-3-8B")  # KNOWN_SHAPES: no hub here


def test_the_shape_is_the_architectures_parameter_count(llama8b):
    assert llama8b.params == llama_params(128256, 4096, 14336, 32, 32, 8) == 8_030_261_248
    assert llama8b.largest_layer == 128256 * 4096  # the embedding (and the head): ZeRO-3 gathers it whole
    assert (llama8b.hidden, llama8b.layers, llama8b.intermediate, llama8b.kv_dim) == (4096, 32, 14336, 1024)
    big = read_model_shape("meta-llama/Meta-Llama-3-70B")
    assert big.params == llama_params(128256, 8192, 28672, 80, 64, 8) == 70_553_706_496
    # Qwen2's q/k/v projections carry biases: 7.62B as its model card says
    qwen = read_model_shape("Qwen/Qwen2.5-7B")
    assert (
        qwen.params == llama_params(152064, 3584, 18944, 28, 28, 4) + 28 * (3584 + 2 * 512) == 7_615_616_512
    )


def test_llama3_8b_zero3_on_8_gpus_by_hand_and_against_deepspeed(llama8b):
    """bf16, ZeRO-3, 8 workers, micro-batch 1 x 2048 tokens."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, big = 8_030_261_248, 128256 * 4096
    e = estimate(llama8b, stage=3, workers=8, bf16=True, seq_len=2048)
    assert (e.weights, e.gradients, e.optimizer, e.gathered) == (2 * p // 8, 6 * p // 8, 12 * p // 8, 4 * big)
    assert e.model_states == 22_176_999_424
    # DeepSpeed's ZeRO-3 estimate (4 x largest layer + 18 P / N) leaves out the 16-bit weight partition
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        p, big, 8, 1, cpu_offload=False, cpu_offload_params=False
    )
    assert e.model_states == ds3 + 2 * p // 8
    # ... and at ZeRO-2 the two agree exactly (2 P + 18 P / N)
    z2 = estimate(llama8b, stage=2, workers=8, bf16=True)
    assert z2.model_states == estimate_zero2_model_states_mem_needs(p, 8, 1, cpu_offload=False)[1]
    # activations: 2048 tokens x 2 bytes x (6 x 4096 + 2 x 1024 + 4 x 14336) per layer, 32 layers
    per_layer = 2048 * 2 * 83968
    assert e.activations == 32 * per_layer == 11_005_853_696
    assert e.logits == 2048 * 128256 * (2 + 4 + 4)
    assert e.total == 35_809_536_000  # 33.4 GiB: fits an 80 GB H100
    gc = estimate(llama8b, stage=3, workers=8, bf16=True, seq_len=2048, gradient_checkpointing=True)
    assert gc.activations == 32 * 2048 * 2 * 4096 + per_layer == 880_803_840
    assert gc.model_states == e.model_states


def test_offload_fp32_stages_and_lora(llama8b):
    p = llama8b.params
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    big = llama8b.largest_layer
    off = estimate(llama8b, stage=3, workers=8, bf16=True, offload_optimizer=True)
    assert off.optimizer == off.gradients == 0 and off.model_states == 2 * p // 8 + 4 * big
    _, ds, _ = estimate_zero3_model_states_mem_needs(p, big, 8, 1, cpu_offload=True, cpu_offload_params=False)
    assert off.model_states == ds
    fp32 = estimate(llama8b, stage=0, workers=4, bf16=False)  # nothing split: 4 + 4 + 8 bytes a parameter
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.gathered) == (4 * p, 4 * p, 8 * p, 0)
    z1 = estimate(llama8b, stage=1, workers=4, bf16=True)
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * p, 6 * p, 12 * p // 4)
    # LoRA r=16 on every Linear but the head: r x (in + out) each
    h, kv, i = 4096, 1024, 14336
    per_layer = 16 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    assert lora_params(llama8b, 16, "all-linear") == 32 * per_layer == 41_943_040
    assert lora_params(llama8b, 8, ["q_proj", "v_proj"]) == 32 * 8 * ((h + h) + (h + kv))
    t = 32 * per_layer
    lora = estimate(llama8b, stage=2, workers=1, bf16=True, trainable=t)
    assert (lora.weights, lora.gradients, lora.optimizer) == (2 * p, 6 * t, 12 * t)


def test_check_fits_names_the_setting_to_change(llama8b):
    def cfg(**kw):
        return config_from_dict(
            {"base_model": "meta-llama/Meta-Llama-3-8B", "datasets": [{"path": "x"}], **kw}
        )

    h100 = 80 * 10**9
    ok = cfg(deepspeed=3, ray_num_workers=8, bf16=True, sequence_len=2048)
    check_fits(estimate_for(ok, gpu=True), h100, ok)  # 33 GiB of 80 GB: no error
    cases = [
        ({"deepspeed": 3, "ray_num_workers": 8, "micro_batch_size": 16}, "gradient_checkpointing: true"),
        (
            {"deepspeed": 3, "ray_num_workers": 8, "micro_batch_size": 32, "gradient_checkpointing": True},
            "lower micro_batch_size or sequence_len",
        ),
        ({"deepspeed": 2, "ray_num_workers": 2}, "deepspeed: 3"),
        ({"deepspeed": 3, "ray_num_workers": 1}, "offload_optimizer: true"),
        ({"deepspeed": 3, "ray_num_workers": 1, "offload_optimizer": True}, None),
    ]
    for kw, fix in cases:
        c = cfg(bf16=True, sequence_len=2048, **kw)
        if fix is None:
            check_fits(estimate_for(c, gpu=True), h100, c)
            continue
        with pytest.raises(IteritError, match="per GPU") as err:
            check_fits(estimate_for(c, gpu=True), h100, c)
        assert fix in str(err.value) and "\n" not in str(err.value)
    # 70B full fine-tuning on one 8 x H100 node: 180 GB of model states a GPU even at ZeRO-3
    big = cfg(base_model="meta-llama/Meta-Llama-3-70B", deepspeed=3, ray_num_workers=8, bf16=True)
    with pytest.raises(IteritError, match="offload_optimizer: true"):
        check_fits(estimate_for(big, gpu=True), h100, big)
    assert estimate_for(big, gpu=True).model_states / GiB == pytest.approx(168.2, abs=0.1)


def test_the_estimate_reads_a_local_model_and_says_when_it_cannot(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = read_model_shape(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape == model_shape(AutoConfig.from_pretrained(tiny_model_dir))
    with pytest.raises(IteritError, match="cannot read the config of /nowhere/model .*: no such folder"):
        read_model_shape("/nowhere/model")
    assert set(KNOWN_SHAPES) >= {"meta-llama/Meta-Llama-3-8B", "Qwen/Qwen2.5-7B"}


def test_the_preflight_logs_on_cpu_and_stops_on_a_gpu_too_small(tiny_model_dir, monkeypatch):
    """trainer.memory_preflight: on CPU the estimate in the log; on GPUs the GPU's memory is read from the
    cluster and a fit that cannot fit is one error line; an unreadable model config skips with a line."""
    import iterit.cluster
    from iterit.training.trainer import memory_preflight

    cfg = config_from_dict({"base_model": tiny_model_dir, "datasets": [{"path": "x"}], "sequence_len": 512})
    lines = []
    memory_preflight(cfg, gpu=False, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("memory per GPU (estimate):") and "not checked" in lines[0]
    monkeypatch.setattr(iterit.cluster, "gpu_memory_bytes", lambda: 8 * GiB)
    memory_preflight(cfg, gpu=True, log=lines.append)
    assert len(lines) == 2 and "not checked" not in lines[1]
    monkeypatch.setattr(iterit.cluster, "gpu_memory_bytes", lambda: 10**6)
    with pytest.raises(IteritError, match=r"over 90% of the GPU's 0\.0 GiB"):
        memory_preflight(cfg, gpu=True, log=lines.append)
    monkeypatch.setattr(iterit.cluster, "gpu_memory_bytes", lambda: None)
    memory_preflight(cfg, gpu=True, log=lines.append)
    assert "no GPU answered" in lines[-1]
    missing = cfg.model_copy(update={"base_model": "/nowhere/model"})
    memory_preflight(missing, gpu=True, log=lines.append)
    assert lines[-1] == (
        "memory preflight skipped: cannot read the config of /nowhere/model for the memory estimate: "
        "no such folder"
    )
