"""Typed config: one tree of small pydantic models, loaded from YAML plus `--set a.b=value` overrides.

Key names follow axolotl / LLaMA-Factory where one exists (base_model, datasets, chat_template,
sequence_len, output_dir, seed); iterit's own keys (iterations, selection.ratio, ...) sit beside them.
The training keys (micro_batch_size, learning_rate, deepspeed, lora_r, ...) stay flat at the top level,
as in those tools, and are defined once, in TrainingConfig: `Config.training()` is that section, the
typed config that crosses into the Ray Train workers.
Unknown keys and wrong types are errors that name the key and the expected type, so a typo fails
at load time, not forty minutes into a run.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from iterit.errors import IteritError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def iteration_rng(seed: int, iteration: int):
    """The one source of every random choice of iteration `iteration` of a run seeded `seed` (the random
    baseline's order, the training order). numpy's SeedSequence mixes both words, so no two (seed,
    iteration) pairs share a stream: seed 42's iteration 1 is not seed 43's iteration 0."""
    import numpy as np

    return np.random.default_rng([seed, iteration])


# A path or id where "~" means the user's home, as in a shell.
HomePath = Annotated[str, AfterValidator(os.path.expanduser)]


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class DatasetConfig(_Section):
    path: HomePath
    """A file, directory or glob; local or an fsspec URI (s3://, gs://, hf://datasets/..., ...). JSON,
    JSONL or Parquet, optionally compressed (.gz, .bz2, .xz, .zst). Or a Hugging Face dataset: a hub id
    (`tatsu-lab/alpaca`), a `save_to_disk` folder, or a local dataset repository (a folder whose
    README.md declares `configs`, or any folder given with `name` or `split`)."""
    type: Literal["auto", "alpaca", "sharegpt", "messages"] = "auto"
    """Row format. `auto` detects it per row from the fields present."""
    field_id: str = "id"
    """Field holding a stable sample id; rows without it get `<file stem>:<row>`."""
    field_instruction: str = "instruction"
    """Alpaca: the instruction field."""
    field_input: str = "input"
    """Alpaca: the optional input field, appended to the instruction as "\\nInput: ..."."""
    field_output: str = "output"
    """Alpaca: the response field."""
    field_conversations: str = "conversations"
    """ShareGPT: the list of {from, value} turns."""
    field_messages: str = "messages"
    """OpenAI-style: the list of {role, content} messages."""
    field_system: str = "system"
    """A row's own system prompt (LLaMA-Factory's `system` column of alpaca and sharegpt rows): used, when
    a non-empty string, for a conversation without a system turn, in place of `system_prompt`."""
    max_samples: int | None = Field(None, ge=1)
    """Read only the first N rows of this dataset (as LLaMA-Factory's max_samples): demos, dry runs."""
    name: str | None = None
    """Hugging Face datasets: the configuration (subset) to load, as `load_dataset(path, name)`."""
    split: str | None = None
    """Hugging Face datasets: the split to read (default `train`; a `save_to_disk` folder of one split:
    that one)."""
    revision: str | None = None
    """Hub datasets: the branch, tag or commit to load."""


class SelectionConfig(_Section):
    method: Literal["iterit", "ifd", "random", "longest", "embedding", "full"] = "iterit"
    """How the training subset is chosen each iteration (`iterit` = IFD x TF-IDF diversity greedy)."""
    ratio: float = 0.05
    """Budget per iteration: a fraction of the corpus (0 < ratio <= 1) or a count (an integer > 1)."""
    update_ratio: float = Field(3.0, ge=1)
    """Iterations after the first re-score the first k * update_ratio samples of the current order."""
    decay: float = Field(0.1, ge=0, le=1)
    """Factor applied to every TF-IDF term of a picked response (1 = IFD only, 0 = a term counts once)."""
    tfidf: Literal["auto", "exact", "hashed"] = "auto"
    """TF-IDF of the responses: exact (scikit-learn's matrix), hashed (2^24 columns, bounded memory), or
    auto (exact up to 200,000 responses, hashed above)."""

    @field_validator("ratio")
    @classmethod
    def _check_ratio(cls, v: float) -> float:
        if not v > 0 or (v > 1 and v != int(v)):
            raise ValueError("must be a fraction in (0, 1] or an integer count > 1")
        return v

    def num_selected(self, n: int) -> int:
        """k: samples trained per iteration out of n (floor(ratio * n), or the count itself)."""
        k = int(self.ratio) if self.ratio > 1 else math.floor(self.ratio * n)
        return max(0, min(n, k))

    def window(self, n: int) -> int:
        """W: samples re-scored in iterations after the first."""
        return min(n, math.floor(self.num_selected(n) * self.update_ratio))


class ScoringConfig(_Section):
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model dtype while scoring. auto: bfloat16 on GPU (fast mode), float32 on CPU (exact mode)."""
    token_budget: int = Field(16384, ge=64)
    """Padded tokens per micro-batch (count x longest); halved automatically on CUDA out-of-memory."""
    batch_size: int = Field(512, ge=1)
    """Samples per Ray Data batch: the unit sorted by length and sent to one actor call."""
    min_actors: int = Field(1, ge=1)
    """Scoring actor pool's minimum size (one model replica per actor)."""
    max_actors: int = Field(1, ge=1)
    """Scoring actor pool's maximum size: Ray Data adds actors up to this as the cluster grows."""
    gpus_per_actor: float | None = Field(None, ge=0)
    """GPUs per scoring actor; None: 1 when the cluster has GPUs, else 0."""
    cpus_per_actor: float = Field(1.0, gt=0)
    """CPUs Ray reserves per scoring actor."""
    resources_per_actor: dict[str, float] | None = None
    """Custom Ray resources per scoring actor besides its CPUs and GPUs, e.g. {scorer: 1}: pins the
    actors to the nodes that declare them (`ray start --resources`). CPU and GPU are not keys here."""
    torch_threads: int | None = Field(None, ge=1)
    """Compute threads per actor on CPU; None: Ray's default (the actor's CPU reservation). On one
    machine, reserve 1 CPU per actor and give it every core here, so Ray's I/O tasks still fit."""
    template_cpus: float = Field(0.5, ge=0)
    """CPUs per reading / templating task (0: they share the scoring actors' CPUs)."""
    embeddings: bool = True
    """Also store the response embedding (mean last hidden state over the span, L2-normalised)."""
    embedding_dim: int | None = Field(None, ge=2)
    """Stored embedding size. None: the model's hidden size. An integer d >= 2: the embedding times a
    fixed Gaussian matrix (hidden x d, entries N(0, 1/d), built from a fixed seed and the two sizes
    only, so every actor and every run uses the same one), then L2-normalised again. At d = 256 a cosine
    moves by ~0.03, enough to change a quarter of the embedding method's picks (docs/measured.md)."""
    embedding_dtype: Literal["float32", "float16"] = "float32"
    """Stored dtype of the embedding values: float16 halves their bytes (each value off by < 2.5e-4)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (default), flash_attention_2 (needs flash-attn), eager."""
    proxy_model: HomePath | None = None
    """A small model (HF folder or hub id; any family) that scores every sample in iteration 0 in the
    base model's place. None: the base model scores all N (the paper's method). When set, iteration
    0 orders all N by the proxy's scores with the configured method, the base model re-scores the first
    W of that order (the window rule of later iterations, or proxy_window) and selects from them:
    the full pass over N costs the proxy's FLOPs, not the base model's (docs/scoring.md#proxy)."""
    proxy_chat_template: str | None = None
    """The proxy's chat template (as chat_template): None, its tokenizer's own (ChatML if none)."""
    proxy_window: int | None = Field(None, ge=1)
    """With a proxy: how many of the proxy's order the base model re-scores in iteration 0 (a count of
    samples). None: W = k x selection.update_ratio, the window of later iterations."""

    @model_validator(mode="after")
    def _check_pool(self) -> ScoringConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors={self.min_actors} > max_actors={self.max_actors}")
        for key, amount in (self.resources_per_actor or {}).items():
            if key in ("CPU", "GPU"):
                raise ValueError(f"resources_per_actor: {key} is set by {key.lower()}s_per_actor, not here")
            if amount < 0:
                raise ValueError(f"resources_per_actor: {key} is {amount:g}; a resource amount is >= 0")
        return self


class TrainingConfig(_Section):
    """The training settings (axolotl / LLaMA-Factory names). In a config file they are top-level keys,
    flat as in those tools (Config inherits them); `Config.training()` is this section alone, which the
    training stage takes and its Ray Train workers rebuild with `TrainingConfig.model_validate`.
    Paper defaults: micro-batch 1 x 32, lr 2e-5, cosine with 3% warmup."""

    micro_batch_size: int = Field(1, ge=1)
    """Sequences per worker per forward/backward."""
    gradient_accumulation_steps: int = Field(32, ge=1)
    """Micro-batches per optimizer step on each worker (global batch = micro x accum x workers)."""
    learning_rate: float = Field(2e-5, gt=0)
    """Peak learning rate (AdamW), reached at the end of the warmup."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the one schedule that spans every iteration's optimizer steps."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Warmup steps as a fraction of the total steps of all iterations."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled weight decay."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping (0: off)."""
    deepspeed: int | str = 3
    """A ZeRO stage (0, 1, 2 or 3) or the path of a DeepSpeed JSON config (iterit sets its batch,
    precision and clipping keys)."""
    offload_optimizer: bool = False
    """ZeRO-2/3: keep the optimizer state in CPU memory (DeepSpeed's CPU Adam)."""
    zero3_init: bool = True
    """ZeRO-3: load the weights straight into each worker's partition (deepspeed.zero.Init through
    transformers' HfDeepSpeedConfig), so no worker holds the whole model; false: every worker loads
    the full model in CPU memory first and DeepSpeed partitions it afterwards."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (torch's non-reentrant
    checkpointing, also with LoRA): activation memory of one layer instead of all, ~30% more compute."""
    bf16: Literal["auto", True, False] = "auto"
    """Train in bfloat16: auto = on GPU yes, on CPU no (fp32 there is exact and as fast)."""
    train_on: Literal["final_response", "all_assistant"] = "final_response"
    """Loss mask: the final response's span as scored (default), or every assistant turn."""
    lora_r: int | None = Field(None, ge=1)
    """LoRA rank (peft); None trains every weight."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get adapters: names, or peft's `all-linear`."""
    lora_export: Literal["merged", "adapter"] = "merged"
    """Each iteration's exported model: LoRA merged into full weights, or the adapter alone."""
    ray_num_workers: int = Field(1, ge=1)
    """Training workers (one per GPU)."""
    use_gpu: bool | None = None
    """Train on GPUs; None: yes when the cluster has any."""
    resources_per_worker: dict[str, float] | None = None
    """Ray resources per training worker, e.g. {CPU: 8, GPU: 1}; None: Ray Train's default."""
    max_failures: int = Field(1, ge=-1)
    """Worker-group restarts per iteration from the last checkpoint (-1: unlimited)."""
    checkpoint_every: int = Field(0, ge=0)
    """Also checkpoint every N optimizer steps inside an iteration (0: only at its end)."""
    keep_checkpoints: Literal["last", "all"] = "last"
    """last: delete an iteration's DeepSpeed checkpoint once the next iteration's training is done (a
    full model with its optimizer state is ~12 bytes per parameter); all: keep every iteration's."""

    @field_validator("deepspeed")
    @classmethod
    def _zero_stage(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v not in (0, 1, 2, 3):
            raise ValueError("a ZeRO stage is 0, 1, 2 or 3 (or give the path of a DeepSpeed JSON file)")
        return v

    def bf16_on(self, gpu: bool) -> bool:
        """Whether training runs in bfloat16 on this hardware (`auto`: on GPUs only)."""
        return gpu if self.bf16 == "auto" else bool(self.bf16)

    def lora(self) -> dict | None:
        """peft's LoraConfig keywords (task_type aside); None when every weight is trained."""
        if not self.lora_r:
            return None
        targets = self.lora_target_modules
        return {
            "r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
        }


class _RunSettings(_Section):
    """Config's keys that come before the training keys. A base of its own only for the order of the
    keys: pydantic lists base classes' fields first, so config.yaml reads model, data, selection and
    scoring, then training."""

    base_model: HomePath
    """HF model folder or hub id of the model being tuned (it also scores the corpus)."""
    datasets: list[DatasetConfig]
    """Training corpora; all files are normalised into one sample table."""
    output_dir: HomePath = "runs/iterit"
    """Run directory: config, manifest, per-iteration artifacts, checkpoints, models, report."""
    chat_template: str | None = None
    """None: the tokenizer's own template (ChatML if it has none); `chatml`; or a Jinja template string."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """Put first in every conversation that has no system turn (None: add nothing)."""
    sequence_len: int = Field(2048, ge=16)
    """Maximum tokens per templated conversation; longer ones are cut at the end."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (off: untrusted input)."""
    seed: int = 42
    """Seed of every random choice: each iteration's training order and the random baseline's order draw
    from iteration_rng(seed, iteration); the workers seed torch with it (LoRA's initial adapters)."""
    iterations: int = Field(3, ge=1)
    """Select-and-train rounds; one learning-rate schedule spans them all."""
    selection: SelectionConfig = SelectionConfig()
    scoring: ScoringConfig = ScoringConfig()


class Config(TrainingConfig, _RunSettings):
    """The whole config: _RunSettings' keys, the training keys flat beside them, then these."""

    report_to: Literal["tensorboard", "mlflow", "wandb"] | None = None
    """Also log metrics to an experiment tracker (training steps from rank 0, stage results from the
    driver); None: only the run directory."""
    storage_path: HomePath | None = None
    """Where Ray Train keeps checkpoints (shared storage for multi-node: NFS or s3://). None:
    OUTPUT_DIR/checkpoints."""

    @field_validator("datasets")
    @classmethod
    def _non_empty(cls, v: list[DatasetConfig]) -> list[DatasetConfig]:
        if not v:
            raise ValueError("needs at least one dataset (- path: ...)")
        return v

    @model_validator(mode="after")
    def _check_method(self) -> Config:
        if self.selection.method == "full" and self.iterations != 1:
            raise ValueError("selection.method=full trains on everything: set iterations: 1")
        if self.selection.method == "full" and self.scoring.proxy_model:
            raise ValueError(
                "selection.method=full scores and trains on every sample: a proxy model saves nothing "
                "there; unset scoring.proxy_model"
            )
        return self

    def proxy(self) -> Config:
        """The config the proxy scores with: its model and chat template in the base model's place, the
        rest (sequence_len, scoring section) the same."""
        if not self.scoring.proxy_model:
            raise ValueError("no scoring.proxy_model in this config")
        return self.model_copy(
            update={"base_model": self.scoring.proxy_model, "chat_template": self.scoring.proxy_chat_template}
        )

    def proxy_window(self, n: int) -> int:
        """W of iteration 0 with a proxy: scoring.proxy_window, or the window of later iterations."""
        w = self.scoring.proxy_window
        return min(n, w) if w is not None else self.selection.window(n)

    def training(self) -> TrainingConfig:
        """The training keys as their own section (what the training stage and its workers take)."""
        return TrainingConfig.model_validate({k: getattr(self, k) for k in TrainingConfig.model_fields})


# --------------------------------------------------------------------------------------------
# Loading, overrides, error messages


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists, creating dicts on the way."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise IteritError(f"--set {dotted}: '{part}' is not an index of a list of {len(node)} items")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise IteritError(f"--set {dotted}: '{'.'.join(parts[:i])}' is a value, not a section")


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` strings; values are parsed as YAML (so 3, true, [a, b] keep their types)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise IteritError(f"--set {item!r}: expected key=value, for example --set selection.ratio=0.1")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, prefix + name + ".")
    return keys


def _expected_type(loc: tuple) -> str:
    """The annotation of the field at `loc`, as a user would write it (int, float, str, one of ...)."""
    model: Any = Config
    ann: Any = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return ""
        ann = fields[part].annotation
        args = getattr(ann, "__args__", ())
        model = (
            ann
            if isinstance(ann, type) and issubclass(ann, BaseModel)
            else next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        )
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "").replace("NoneType", "None")


def _format_errors(err: ValidationError, source: str) -> str:
    known = _all_keys(Config)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            leaf = str(e["loc"][-1])
            # The same name in another section first (a flat axolotl key), then a likely typo.
            near = [k for k in known if k.endswith("." + leaf)] or difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(known)}"
            lines.append(f"unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}' ({_expected_type(e['loc'])})")
        else:
            expected = _expected_type(e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(
                f"'{key}' = {e.get('input')!r}: {msg}" + (f" (expected {expected})" if expected else "")
            )
    return f"invalid config {source}: " + "; ".join(lines)


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise IteritError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--set` overrides, validate. Errors name the file and the key."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise IteritError(
            f"config file not found: {p} (pass the path of a YAML file, e.g. configs/demo.yaml)"
        )
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise IteritError(f"config {p}{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(tree, dict):
        raise IteritError(f"config {p} must be a mapping of keys to values, got {type(tree).__name__}")
    return config_from_dict(apply_overrides(tree, overrides or []), str(p))


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (every default spelled out) atomically."""
    from iterit.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
