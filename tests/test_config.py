from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from iterit.config import (
    Config,
    SelectionConfig,
    TrainingConfig,
    config_from_dict,
    load_config,
    save_config,
)
from iterit.errors import IteritError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
MINIMAL = "base_model: m\ndatasets:\n  - path: d.jsonl\n"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_loads(path):
    assert isinstance(load_config(path), Config)


def test_defaults_overrides_and_resolved_copy(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "selection.ratio=0.1",
            "sequence_len=1024",
            "datasets.0.type=alpaca",
            "system_prompt=null",
            "chat_template=chatml",
        ],
    )
    assert (cfg.selection.ratio, cfg.sequence_len, cfg.datasets[0].type) == (0.1, 1024, "alpaca")
    assert cfg.system_prompt is None and cfg.chat_template == "chatml"
    assert (cfg.seed, cfg.iterations, cfg.selection.decay, cfg.selection.update_ratio) == (42, 3, 0.1, 3.0)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["selection"]["method"] == "iterit"


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        (
            MINIMAL + "selection:\n  ratoi: 0.1\n",
            [],
            "unknown key 'selection.ratoi'; did you mean 'selection.ratio'?",
        ),
        (MINIMAL + "ratio: 0.1\n", [], "unknown key 'ratio'; did you mean 'selection.ratio'?"),
        (MINIMAL, ["sequence_len=abc"], "'sequence_len' = 'abc': Input should be a valid integer"),
        (MINIMAL, ["sequence_len=abc"], "(expected int)"),
        (MINIMAL, ["selection.method=best"], "'selection.method' = 'best'"),
        (MINIMAL, ["selection.ratio=1.5"], "must be a fraction in (0, 1] or an integer count > 1"),
        (MINIMAL, ["selection.decay=2"], "'selection.decay' = 2: Input should be less than or equal to 1"),
        (MINIMAL, ["datasets.3.path=x"], "--set datasets.3.path: '3' is not an index of a list of 1 items"),
        (MINIMAL, ["seed"], "expected key=value"),
        (
            MINIMAL,
            ["selection.update_ratio=0.5"],
            "'selection.update_ratio' = 0.5: Input should be greater than or equal to 1",
        ),
        (
            MINIMAL,
            ["iterations=0"],
            "'iterations' = 0: Input should be greater than or equal to 1 (expected int)",
        ),
        ("datasets: []\n", [], "missing required key 'base_model'"),
        ("base_model: m\ndatasets: []\n", [], "needs at least one dataset"),
        (MINIMAL + "selection:\n  method: full\n", [], "selection.method=full trains on everything"),
        ("base_model: [unclosed\n", [], "line 2, column 1 is not valid YAML"),
        ("- a\n- b\n", [], "must be a mapping"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(tmp_path, text, overrides, message):
    with pytest.raises(IteritError) as e:
        load_config(write(tmp_path, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_missing_config_file(tmp_path):
    with pytest.raises(IteritError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "ratio,n,k,w",
    [(0.05, 1000, 50, 150), (0.05, 19, 0, 0), (100, 1000, 100, 300), (100, 50, 50, 50), (1.0, 10, 10, 10)],
)
def test_budget_and_window(ratio, n, k, w):
    sel = SelectionConfig(ratio=ratio)
    assert (sel.num_selected(n), sel.window(n)) == (k, w)


def test_home_is_expanded():
    cfg = config_from_dict({"base_model": "~/m", "datasets": [{"path": "~/d.jsonl"}]})
    assert not cfg.base_model.startswith("~") and not cfg.datasets[0].path.startswith("~")


# The resolved config.yaml of MINIMAL as iterit wrote it before the training keys became a section:
# runs saved then must load, and a config saved now must read the same, key for key, in this order.
OLD_RUN_CONFIG = """\
base_model: m
datasets:
- path: d.jsonl
  type: auto
  field_id: id
  field_instruction: instruction
  field_input: input
  field_output: output
  field_conversations: conversations
  field_messages: messages
  max_samples: null
output_dir: runs/iterit
chat_template: null
system_prompt: You are a helpful assistant.
sequence_len: 2048
trust_remote_code: false
seed: 42
iterations: 3
selection:
  method: iterit
  ratio: 0.05
  update_ratio: 3.0
  decay: 0.1
  tfidf: auto
scoring:
  dtype: auto
  token_budget: 16384
  batch_size: 512
  min_actors: 1
  max_actors: 1
  gpus_per_actor: null
  cpus_per_actor: 1.0
  torch_threads: null
  template_cpus: 0.5
  embeddings: true
  attn_implementation: sdpa
micro_batch_size: 1
gradient_accumulation_steps: 32
learning_rate: 2.0e-05
lr_scheduler: cosine
warmup_ratio: 0.03
weight_decay: 0.0
max_grad_norm: 1.0
deepspeed: 3
offload_optimizer: false
bf16: auto
train_on: final_response
lora_r: null
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: all-linear
lora_export: merged
ray_num_workers: 1
use_gpu: null
resources_per_worker: null
max_failures: 1
checkpoint_every: 0
keep_checkpoints: last
report_to: null
storage_path: null
"""


# Keys added since that run was saved, with their defaults: a config saved now spells them out too.
ADDED_SINCE = {
    "  embeddings: true\n": "  embedding_dim: null\n  embedding_dtype: float32\n",
    "  cpus_per_actor: 1.0\n": "  resources_per_actor: null\n",
    "offload_optimizer: false\n": "zero3_init: true\ngradient_checkpointing: false\n",
    "  max_samples: null\n": "  name: null\n  split: null\n  revision: null\n",
    "  attn_implementation: sdpa\n": "  proxy_model: null\n  proxy_chat_template: null\n  proxy_window: null\n",
    "  field_messages: messages\n": "  field_system: system\n",
}


def test_an_older_runs_config_loads_and_saves_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, OLD_RUN_CONFIG))
    assert cfg == load_config(write(tmp_path, MINIMAL))
    save_config(cfg, tmp_path / "run" / "config.yaml")
    now = OLD_RUN_CONFIG
    for after, added in ADDED_SINCE.items():
        now = now.replace(after, after + added)
    assert (tmp_path / "run" / "config.yaml").read_text() == now
    assert list(cfg.model_dump()) == list(yaml.safe_load(now))


def test_flat_training_keys_become_the_typed_section(tmp_path):
    text = MINIMAL + (
        "micro_batch_size: 4\ngradient_accumulation_steps: 8\nlearning_rate: 1.0e-4\nlr_scheduler: linear\n"
        "warmup_ratio: 0.1\nweight_decay: 0.01\nmax_grad_norm: 0.5\ndeepspeed: 2\noffload_optimizer: true\n"
        "bf16: false\ntrain_on: all_assistant\nlora_r: 8\nlora_alpha: 32\nlora_dropout: 0.1\n"
        "lora_target_modules: [q_proj, v_proj]\nlora_export: adapter\nray_num_workers: 2\nuse_gpu: false\n"
        "resources_per_worker: {CPU: 2}\nmax_failures: 3\ncheckpoint_every: 5\nkeep_checkpoints: all\n"
    )
    cfg = load_config(write(tmp_path, text), ["learning_rate=3e-4"])
    t = cfg.training()
    assert type(t) is TrainingConfig
    assert t.model_dump() == {
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 8,
        "learning_rate": 3e-4,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "max_grad_norm": 0.5,
        "deepspeed": 2,
        "offload_optimizer": True,
        "zero3_init": True,
        "gradient_checkpointing": False,
        "bf16": False,
        "train_on": "all_assistant",
        "lora_r": 8,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "lora_target_modules": ["q_proj", "v_proj"],
        "lora_export": "adapter",
        "ray_num_workers": 2,
        "use_gpu": False,
        "resources_per_worker": {"CPU": 2.0},
        "max_failures": 3,
        "checkpoint_every": 5,
        "keep_checkpoints": "all",
    }
    # What the workers derive from it.
    assert t.lora() == {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    assert not t.bf16_on(gpu=True)  # bf16: false wins; auto is bf16 on GPUs only
    assert TrainingConfig().bf16_on(gpu=True) and not TrainingConfig().bf16_on(gpu=False)
    assert TrainingConfig().lora() is None
    # The section and the flat keys are one definition: the same names, defaults and docs.
    for name, f in TrainingConfig.model_fields.items():
        assert Config.model_fields[name].default == f.default and f.description, name


def test_the_training_section_rejects_unknown_keys_and_bad_stages():
    good = TrainingConfig(micro_batch_size=2).model_dump()
    assert TrainingConfig.model_validate(good).micro_batch_size == 2
    with pytest.raises(ValidationError, match="micro_batch_sise"):
        TrainingConfig.model_validate({**good, "micro_batch_sise": 2})
    with pytest.raises(ValidationError, match="ZeRO stage"):
        TrainingConfig.model_validate({**good, "deepspeed": 5})
    with pytest.raises(ValidationError, match="base_model"):  # a key of the whole config, not the section
        TrainingConfig.model_validate({**good, "base_model": "m"})


def test_a_misspelt_flat_training_key_names_the_key_meant(tmp_path):
    with pytest.raises(IteritError, match="unknown key 'micro_batch_sise'; did you mean 'micro_batch_size'"):
        load_config(write(tmp_path, MINIMAL + "micro_batch_sise: 2\n"))
    with pytest.raises(IteritError, match="'deepspeed' = 4: a ZeRO stage is 0, 1, 2 or 3"):
        load_config(write(tmp_path, MINIMAL + "deepspeed: 4\n"))
