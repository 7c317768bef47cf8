import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iterit.cli import command_names, main

README = Path(__file__).parent.parent / "README.md"


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_python_dash_m_and_readme_list_the_same_commands():
    res = subprocess.run(
        [sys.executable, "-m", "iterit", "--help"], capture_output=True, text=True, check=True
    )
    for name in command_names():
        assert re.search(rf"^\W+{re.escape(name)}\s", res.stdout, re.M), name
    # The README's command list is the code block right after "## Commands" (the stage pages in docs/
    # repeat their own commands; this block is the one that lists them all).
    block = README.read_text().split("## Commands", 1)[1].split("```")[1]
    in_readme = {m.group(1) for m in re.finditer(r"^iterit ([a-z][a-z-]*)", block, re.M)}
    missing, unknown = set(command_names()) - in_readme, in_readme - set(command_names())
    assert not missing and not unknown, (
        f"README ## Commands: missing {sorted(missing)}, unknown {sorted(unknown)}"
    )


def test_ingest_from_the_command_line(hostile_corpus, tmp_path, capsys):
    src, expected = hostile_corpus
    code, out, err = run(
        [
            "ingest",
            "--data",
            str(src / "rows.jsonl"),
            "--data",
            str(src / "array.json"),
            "--output",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, err
    assert re.search(r"^total\s+20\s+7\s+13$", out, re.M)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["read"] == summary["accepted"] + summary["rejected"] == 20


def test_ingest_with_a_config(hostile_corpus, tmp_path, capsys):
    src, _ = hostile_corpus
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base_model: m\ndatasets:\n  - path: {src / 'array.json'}\noutput_dir: {tmp_path / 'run'}\n"
    )
    code, out, _ = run(["ingest", "--config", str(cfg), "--set", "system_prompt=Be brief."], capsys)
    assert code == 0 and (tmp_path / "run" / "ingest" / "samples.parquet").exists()
    from iterit.config import load_config

    assert load_config(tmp_path / "run" / "ingest" / "config.yaml").system_prompt == "Be brief."
    from iterit.data import read_samples

    assert read_samples(str(tmp_path / "run" / "ingest" / "samples.parquet")).column("messages")[0].as_py()[
        0
    ] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["ingest", "--data", "/nonexistent/x.jsonl", "--output", "o"],
            "error: data path not found: /nonexistent/x.jsonl",
        ),
        (["ingest", "--output", "o"], "error: nothing to ingest"),
        (["ingest", "--data", "x.jsonl", "--type", "csv", "--output", "o"], "error: --type 'csv'"),
        (["config", "/nonexistent.yaml"], "error: config file not found"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "usage", "error"),
    [
        (["select", "--bogus"], "Usage: iterit select [OPTIONS]", "Error: No such option: --bogus"),
        (
            ["selec"],
            "Usage: iterit [OPTIONS] COMMAND",
            "Error: No such command 'selec'. Did you mean 'select'?",
        ),
        (["frobnicate"], "Usage: iterit [OPTIONS] COMMAND", "Error: No such command 'frobnicate'."),
    ],
)
def test_a_usage_error_prints_the_usage_and_clicks_suggestion(argv, usage, error, capsys):
    """Not "internal error: NoSuchOption": the usage line, the help hint, the error, and code 2."""
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith(usage) and error in err and "internal error" not in err, err


def test_debug_shows_the_traceback():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "iterit",
            "--debug",
            "ingest",
            "--data",
            "/nonexistent.jsonl",
            "--output",
            "o",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "Traceback" in res.stderr and "IteritError" in res.stderr


def test_config_command_prints_the_resolved_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: m\ndatasets:\n  - path: d.jsonl\n")
    code, out, _ = run(["config", str(cfg), "--set", "selection.decay=0.5"], capsys)
    assert code == 0 and "decay: 0.5" in out and "sequence_len: 2048" in out
    code, _, err = run(["config", str(cfg), "--set", "selection.dcay=0.5"], capsys)
    assert code == 2 and "did you mean 'selection.decay'" in err


def test_config_command_prints_the_memory_estimate_of_the_paper_config(capsys):
    """The paper's Llama-3-8B config (shape known without the hub), with and without checkpointing: the
    YAML on stdout, the estimate on stderr (ZeRO-3 over 8 GPUs, 2048 tokens; tests/test_memory.py)."""
    paper = str(Path(__file__).parent.parent / "configs" / "llama3-8b-alpaca.yaml")
    code, out, err = run(["config", paper], capsys)
    assert code == 0 and "deepspeed: 3" in out and "memory" not in out
    assert err.strip() == (
        "# memory per GPU (estimate): 33.4 GiB = model states 20.7 (weights 1.9, gradients 5.6, "
        "optimizer 11.2, gathered layer 2.0) + activations 10.2 + logits 2.4"
    )
    code, out, err = run(["config", paper, "--set", "gradient_checkpointing=true"], capsys)
    assert code == 0 and "gradient_checkpointing: true" in out and "+ activations 0.8 +" in err


def test_ray_job_entrypoint_runs_the_same_ingest(hostile_corpus, tmp_path):
    src, _ = hostile_corpus
    root = Path(__file__).parent.parent
    res = subprocess.run(
        [
            sys.executable,
            str(root / "ray_jobs" / "ingest.py"),
            "--data",
            str(src / "array.json"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["accepted"] == 3


def test_a_full_disk_deep_in_a_chain_is_found():
    """A Ray worker's ENOSPC reaches the driver wrapped (a RayTaskError's cause, a chained exception):
    main() prints it as the disk-full line, not as an internal error."""
    import errno

    from iterit.cli import disk_full

    class Wrapped(Exception):  # as RayTaskError keeps the worker's exception
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/iter_0/scores/part-3.parquet")
    try:
        raise RuntimeError("the write failed") from Wrapped(full)
    except RuntimeError as e:
        assert disk_full(e) is full
    assert disk_full(RuntimeError("x")) is None and disk_full(OSError(errno.EACCES, "denied")) is None
