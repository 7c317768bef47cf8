"""The Python API (docs/api.md): every example of the page runs as written, on the tiny model, and
gives what the commands give."""

import json
import os
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

API_DOC = Path(__file__).parent.parent / "docs" / "api.md"
DOC_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.S)


def test_import_iterit_loads_neither_torch_nor_ray():
    """Nor pydantic: the GPU check imports iterit.scoring.losses where only torch and transformers are.
    The API's functions load on first use, and are the API's own."""
    import subprocess

    heavy = "('torch', 'ray', 'transformers', 'pydantic')"
    code = f"import iterit, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import iterit
    import iterit.api

    assert [getattr(iterit, n) for n in iterit.API] == [getattr(iterit.api, n) for n in iterit.API]
    with pytest.raises(AttributeError):
        iterit.frobnicate  # noqa: B018


@pytest.fixture()
def in_tmp(tmp_path, loop_corpus):
    """The examples' working directory: corpus.jsonl (the loop corpus) and relative paths under it."""
    (tmp_path / "corpus.jsonl").write_text(loop_corpus.read_text())
    here = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(here)


def run_example(source: str, replace: dict[str, str]) -> dict:
    """Run a page example as written, but for `replace` (the hub model -> the tiny one, say)."""
    for old, new in replace.items():
        assert old in source, old
        source = source.replace(old, new)
    scope: dict = {}
    exec(compile(source, str(API_DOC), "exec"), scope)
    return scope


def test_the_select_and_export_example_picks_as_the_commands_do(ray_local, tiny_model_dir, in_tmp, cli):
    assert len(examples()) == 3
    scope = run_example(examples()[0], {DOC_MODEL: tiny_model_dir})
    picks = scope["picks"]
    assert len(picks) == 3 and [p["rank"] for p in picks] == [0, 1, 2]  # 5% of the 60 accepted rows
    exported = [json.loads(line) for line in open(in_tmp / "work" / "picks.jsonl")]
    assert [r["id"] for r in exported] == [p["id"] for p in picks]
    # The same through the command: `iterit select` on the API's scores picks the same ids.
    code, _, err = cli(
        ["select", "--data", "corpus.jsonl", "--scores", "work/scores", "--ratio", "0.05", "--output", "cmd"]
    )
    assert code == 0, err
    assert [json.loads(line)["id"] for line in open(in_tmp / "cmd" / "selection.jsonl")] == [
        p["id"] for p in picks
    ]


def test_scoring_composes_with_a_users_own_dataset(ray_local, tiny_model_dir, in_tmp):
    import pyarrow as pa
    import ray

    import iterit
    from iterit.data import SAMPLE_SCHEMA
    from iterit.errors import IteritError

    scope = run_example(examples()[1], {DOC_MODEL: tiny_model_dir})
    rows = scope["hard"].take_all()
    assert rows and all(set(r) == {"id", "ifd"} and r["ifd"] < 1.0 for r in rows)
    # A Ray Dataset's scores are those of the same rows read from a samples file.
    items = scope["rows"].take_all()
    table = pa.Table.from_pylist(
        [{**r, "source": "x", "row": i} for i, r in enumerate(items)], schema=SAMPLE_SCHEMA
    )
    pq.write_table(table, "samples.parquet")
    from_file = iterit.score("samples.parquet", model=tiny_model_dir, embeddings=False).take_all()
    from_ds = {r["id"]: r["ifd"] for r in scope["scored"].take_all()}
    assert len(from_file) == 8 and all(abs(r["ifd"] - from_ds[r["id"]]) < 1e-6 for r in from_file)
    with pytest.raises(IteritError, match="no \\['messages'\\] column"):
        iterit.score(ray.data.from_items([{"id": "a"}]), model=tiny_model_dir)


def test_the_run_example_runs_the_loop(ray_local, tiny_run_config, loop_corpus, in_tmp):
    (in_tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_run_config(loop_corpus, in_tmp / "run")))
    scope = run_example(
        examples()[2],
        {'"configs/demo.yaml"': '"tiny.yaml"', '"datasets.0.max_samples=200"': '"datasets.0.max_samples=30"'},
    )
    result = scope["result"]
    assert result["run_dir"] == str(in_tmp / "run") and len(result["iterations"]) == 1
    manifest = json.loads((in_tmp / "run" / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
