"""Per-GPU memory of a fit, estimated before it starts, so a run that cannot fit fails in seconds with
the setting to change instead of an out-of-memory after the model has loaded.

    model_shape(base_model)      ModelShape: parameters (exact: the architecture built on the meta
                                 device), the largest layer, hidden size, layers, vocabulary
    estimate(shape, ...)         MemoryEstimate: model states + activations + logits, plain arithmetic
    estimate_for(cfg, gpu)       the same from a Config (LoRA's trainable parameters counted per layer)
    check_fits(est, gpu_bytes)   the one-line error naming the setting that would make it fit

Model states (bytes per parameter P, T of them trainable, w = 2 in bf16, 4 in fp32, N workers):
    weights w*P                 split over N at ZeRO-3
    gradients w*T (+4*T fp32 copy in bf16)          split over N from ZeRO-2; offloaded: on the CPU
    optimizer 8*T Adam moments (+4*T fp32 master weights in bf16)   split from ZeRO-1; offloaded: CPU
    ZeRO-3 adds the largest layer gathered (its weights and gradients, 2*w*L)
In bf16 at ZeRO-2, and offloaded at ZeRO-3, this is what DeepSpeed's estimate_zero2/3_model_states_
mem_needs give (2P + 18P/N; 4L + 2P/N); at ZeRO-3 without offload it counts the 16-bit weight
partition (2P/N) that estimate_zero3_model_states_mem_needs leaves out.
Activations saved for the backward pass per decoder layer (sdpa/flash attention: no s x s scores),
b x s tokens of a = w bytes: layer input and its norm, q, k, v, attention output, the MLP's input and
norm, gate, up, their activation and product = b*s*a*(6*h + 2*kv + 4*i). With gradient checkpointing
each layer keeps only its input (b*s*a*h) and one layer is recomputed at a time. Logits: b*s*V in the
model dtype, their fp32 copy for the loss and its fp32 gradient. Not counted: the CUDA context, NCCL
buffers and allocator fragmentation, which the 90% headroom of check_fits leaves room for.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from iterit.errors import IteritError

GiB = 1024**3
HEADROOM = 0.9  # share of a GPU's memory the estimate may fill (CUDA context, NCCL, fragmentation)


@dataclass(frozen=True)
class ModelShape:
    params: int
    """Parameters, tied embeddings counted once."""
    largest_layer: int
    """Parameters of the largest single module (ZeRO-3 gathers one at a time): usually the embedding."""
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    """Width of k and v (key-value heads x head dim; the hidden size without grouped-query attention)."""
    vocab: int
    linear_shapes: tuple[tuple[str, int, int], ...] = ()
    """(module name, in, out) of every nn.Linear: LoRA's trainable parameters are r x (in + out) each."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int
    logits: int

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.logits

    def line(self) -> str:
        g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
        return (
            f"memory per GPU (estimate): {g(self.total)} GiB = model states {g(self.model_states)} "
            f"(weights {g(self.weights)}, gradients {g(self.gradients)}, optimizer {g(self.optimizer)}, "
            f"gathered layer {g(self.gathered)}) + activations {g(self.activations)} "
            f"+ logits {g(self.logits)}"
        )


def model_shape(config) -> ModelShape:
    """The shape of a transformers model config (a PretrainedConfig): the architecture built on the meta
    device, so the parameter count is exact for any model class, at no memory cost."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = getattr(config, "get_text_config", lambda: config)()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    linears = tuple(
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab=text.vocab_size,
        linear_shapes=linears,
    )


def lora_params(shape: ModelShape, r: int, targets: list[str] | str) -> int:
    """LoRA's trainable parameters: r x (in + out) per adapted Linear; `all-linear` is peft's (every
    Linear but the output head), a list matches a module name's last part."""
    total = 0
    for name, fan_in, fan_out in shape.linear_shapes:
        last = name.rsplit(".", 1)[-1]
        hit = last != "lm_head" if targets == "all-linear" else last in targets
        total += r * (fan_in + fan_out) if hit else 0
    return total


def estimate(
    shape: ModelShape,
    *,
    stage: int,
    workers: int,
    bf16: bool,
    offload_optimizer: bool = False,
    trainable: int | None = None,
    micro_batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Bytes one GPU holds at the peak of a step (module docstring: what is counted and how)."""
    p, t, n, w = shape.params, shape.params if trainable is None else trainable, workers, 2 if bf16 else 4
    weights = w * p // n if stage >= 3 else w * p
    gradients = 0 if offload_optimizer else (w + (4 if bf16 else 0)) * t  # offload streams them out
    gradients = gradients // n if stage >= 2 else gradients
    optimizer = 0 if offload_optimizer else (8 + (4 if bf16 else 0)) * t
    optimizer = optimizer // n if stage >= 1 else optimizer
    gathered = 2 * w * shape.largest_layer if stage >= 3 else 0
    tokens = micro_batch * seq_len
    layer = tokens * w * (6 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate)
    if gradient_checkpointing:  # every layer's input kept, one layer's activations recomputed at a time
        activations = shape.layers * tokens * w * shape.hidden + layer
    else:
        activations = shape.layers * layer
    logits = tokens * shape.vocab * (w + 4 + 4)
    return MemoryEstimate(weights, gradients, optimizer, gathered, activations, logits)


def estimate_for(cfg, gpu: bool, shape: ModelShape | None = None) -> MemoryEstimate:
    """The estimate for a Config's training on `gpu` (or CPU) workers; `shape` read from base_model
    unless given. A DeepSpeed JSON file's stage counts when it has one (else ZeRO-0)."""
    from iterit.training.trainer import deepspeed_config

    shape = shape or read_model_shape(cfg.base_model, cfg.trust_remote_code)
    ds = deepspeed_config(cfg, cfg.ray_num_workers, gpu)
    lora = cfg.lora()
    return estimate(
        shape,
        stage=int(ds["zero_optimization"].get("stage", 0)),
        workers=cfg.ray_num_workers,
        bf16=ds["bf16"]["enabled"],
        offload_optimizer=cfg.offload_optimizer,
        trainable=lora_params(shape, lora["r"], lora["target_modules"]) if lora else None,
        micro_batch=cfg.micro_batch_size,
        seq_len=cfg.sequence_len,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


# The shapes of the paper's models (and the 70B users go to), from their config.json: the estimate of
# a paper config works where the hub is out of reach (a laptop preparing a cluster run, CI).
KNOWN_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),
    "meta-llama/Meta-Llama-3-70B": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
    ),
}  # fmt: skip


@functools.lru_cache(maxsize=8)
def read_model_shape(base_model: str, trust_remote_code: bool = False) -> ModelShape:
    """base_model's shape from its config.json (a folder, or the hub / its cache); the paper's models
    from KNOWN_SHAPES when their config cannot be read."""
    from transformers import AutoConfig

    if base_model in KNOWN_SHAPES and not os.path.isdir(base_model):
        try:  # the cache, else the known shape: no hub round trips (with retries) for a known model
            config = AutoConfig.from_pretrained(base_model, local_files_only=True)
        except (OSError, ValueError):
            config = AutoConfig.for_model(**KNOWN_SHAPES[base_model])
        return model_shape(config)
    if base_model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(base_model)):
        raise IteritError(f"cannot read the config of {base_model} for the memory estimate: no such folder")
    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IteritError(
            f"cannot read the config of {base_model} for the memory estimate ({first}); give a local "
            "folder, or set HF_HOME to a cache that holds it"
        ) from None
    return model_shape(config)


def check_fits(est: MemoryEstimate, gpu_bytes: int, cfg) -> None:
    """One line when the estimate passes HEADROOM of the GPU's memory, naming what to change first:
    checkpointing when activations dominate, then a higher ZeRO stage, offload, LoRA, more workers."""
    if est.total <= HEADROOM * gpu_bytes:
        return
    activations = est.activations + est.logits
    stage = cfg.deepspeed if isinstance(cfg.deepspeed, int) else None
    if activations > est.model_states and not cfg.gradient_checkpointing:
        fix = "set gradient_checkpointing: true"
    elif activations > est.model_states:
        fix = "lower micro_batch_size or sequence_len"
    elif stage is not None and stage < 3 and cfg.ray_num_workers > 1:
        fix = "set deepspeed: 3 (ZeRO-3 splits the weights over the workers)"
    elif not cfg.offload_optimizer:
        fix = "set offload_optimizer: true (with deepspeed: 2 or 3), or add ray_num_workers"
    elif not cfg.lora_r:
        fix = "train LoRA adapters (lora_r: 16), or add ray_num_workers"
    else:
        fix = "add ray_num_workers"
    raise IteritError(
        f"training needs ~{est.total / GiB:.1f} GiB per GPU, over {HEADROOM:.0%} of the GPU's "
        f"{gpu_bytes / GiB:.1f} GiB (model states {est.model_states / GiB:.1f}, activations and logits "
        f"{activations / GiB:.1f}): {fix}"
    )
