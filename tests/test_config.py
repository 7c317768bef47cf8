from pathlib import Path

import pytest
import yaml

from iterit.config import Config, SelectionConfig, config_from_dict, load_config, save_config
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
