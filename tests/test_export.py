"""iterit export: the picks in the layouts TRL, axolotl and LLaMA-Factory document, in pick order, read
back by `datasets` and by iterit's own ingest exactly."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from iterit.config import DatasetConfig
from iterit.data import ingest
from iterit.errors import IteritError
from iterit.export_data import as_record, export, find_source, pick_table
from iterit.rundir import SelectionFiles

ROWS = [
    {"id": "a1", "instruction": "Name a colour.", "output": "Blue."},
    {"id": "a2", "instruction": "Translate «chat».", "input": "fr → en", "output": "Cat — or chat 😺."},
    {"id": "a3", "instruction": "Say hi.", "output": "Hi!", "system": "You are terse."},
    {
        "id": "s1",
        "conversations": [
            {"from": "human", "value": 'Line one\nline two with "quotes" and a \\ backslash'},
            {"from": "gpt", "value": "Read:\n\ttabbed"},
            {"from": "human", "value": "And the 日本語?"},
            {"from": "gpt", "value": "日本語 it is."},
        ],
        "system": "LLaMA-Factory keeps the system prompt here.",
    },
    {
        "id": "m1",
        "messages": [
            {"role": "system", "content": "You explain code."},
            {"role": "user", "content": "Why the error?"},
            {"role": "assistant", "content": "The file is not there."},
        ],
    },
    {"id": "unpicked", "instruction": "Never picked.", "output": "So never exported."},
]
PICK_ORDER = ["s1", "a2", "m1", "a1", "a3"]  # not the file's order: the export keeps the pick order


@pytest.fixture(scope="module")
def selection_dir(tmp_path_factory):
    """An `iterit select --output` folder: the ingested samples and a selection of five of them."""
    out = tmp_path_factory.mktemp("select")
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    ingest([DatasetConfig(path=str(corpus))], str(out / "ingest"))
    ifd = np.array([0.91, 0.8, float("nan"), 0.5, 0.42, 0.3])  # NaN: a pick without a score
    SelectionFiles(str(out)).write(PICK_ORDER + ["unpicked"], ifd, ["pick"] * 6, [0.3, 0.2, 0.1, 0.05, 0.01])
    samples = {r["id"]: r["messages"] for r in pq.read_table(out / "ingest" / "samples.parquet").to_pylist()}
    return out, samples


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_each_format_has_exactly_the_fields_its_trainer_documents():
    single = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    multi = (
        single[:2]
        + [{"role": "assistant", "content": "A1."}, {"role": "user", "content": "Q2?"}]
        + single[2:]
    )
    # TRL SFTTrainer's conversational dataset, axolotl's chat_template: messages of role and content.
    assert as_record(multi, "messages") == {"messages": multi}
    # LLaMA-Factory's sharegpt layout: conversations of from/value, human and gpt, the system apart.
    assert as_record(multi, "sharegpt") == {
        "conversations": [
            {"from": "human", "value": "Q?"},
            {"from": "gpt", "value": "A1."},
            {"from": "human", "value": "Q2?"},
            {"from": "gpt", "value": "A."},
        ],
        "system": "Sys.",
    }
    # Alpaca (and LLaMA-Factory's alpaca with its system column): one instruction, one output.
    assert as_record(single, "alpaca") == {"instruction": "Q?", "input": "", "output": "A.", "system": "Sys."}
    assert as_record(multi, "alpaca") is None
    assert as_record(single[1:], "sharegpt")["system"] == ""


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_an_export_is_read_back_exactly_by_datasets_and_by_ingest(ray_local, selection_dir, tmp_path, fmt):
    import datasets

    sel, samples = selection_dir
    out = tmp_path / f"picks.{fmt}.jsonl"
    summary = export(find_source(None, str(sel)), fmt, str(out), log=lambda *_: None)
    assert summary["outputs"]["iter_0"] == {"path": str(out), "picks": 5, "written": 5, "refused": 0}
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == PICK_ORDER
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["ifd"] == 0.91 and rows[2]["ifd"] is None and rows[4]["gain"] == 0.01
    assert "日本語" in out.read_text(encoding="utf-8")  # the texts' own characters, not \\u escapes
    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert loaded["id"] == PICK_ORDER
    key = "messages" if fmt == "messages" else "conversations"
    assert loaded[key] == [r[key] for r in rows]
    back = ingest([DatasetConfig(path=str(out))], str(tmp_path / "again"))
    assert back["accepted"] == 5 and back["rejected"] == 0
    again = pq.read_table(tmp_path / "again" / "samples.parquet").to_pylist()
    assert {r["id"]: r["messages"] for r in again} == {i: samples[i] for i in PICK_ORDER}
    if fmt == "sharegpt":
        info = json.loads((tmp_path / "dataset_info.json").read_text())
        assert info[f"picks.{fmt}"] == {
            "file_name": out.name,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {
                "role_tag": "from",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "gpt",
                "system_tag": "system",
            },
        }


def test_alpaca_refuses_conversations_with_earlier_turns_and_counts_them(ray_local, selection_dir, tmp_path):
    sel, samples = selection_dir
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    out = tmp_path / "alpaca"  # a folder of parts
    summary = export(find_source(None, str(sel)), "alpaca", str(out), plain=True, log=lambda *_: None)
    assert summary["outputs"]["iter_0"]["written"] == 4 and summary["outputs"]["iter_0"]["refused"] == 1
    parts = sorted(out.iterdir())
    assert [p.suffix for p in parts] == [".jsonl"] * len(parts)
    rows = [r for p in parts for r in read_jsonl(p)]
    assert [set(r) for r in rows] == [{"instruction", "input", "output", "system"}] * 4  # --plain: no id
    assert [r["output"] for r in rows] == [samples[i][-1]["content"] for i in ["a2", "m1", "a1", "a3"]]
    assert rows[3]["system"] == "You are terse."  # the row's own system field, kept through ingest
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json"}  # merged, not overwritten
    assert info["alpaca"]["columns"] == {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
    }
    back = ingest([DatasetConfig(path=str(out))], str(tmp_path / "again"))
    assert [r["messages"] for r in pq.read_table(tmp_path / "again" / "samples.parquet").to_pylist()] == [
        samples[i] for i in ["a2", "m1", "a1", "a3"]
    ]
    assert back["rejected"] == 0


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_parquet_and_hf_hold_the_samples_columns_in_pick_order(ray_local, selection_dir, tmp_path, fmt):
    import datasets

    sel, samples = selection_dir
    out = tmp_path / ("picks.parquet" if fmt == "parquet" else "picks_hf")
    export(find_source(None, str(sel)), fmt, str(out), log=lambda *_: None)
    ds = (
        datasets.load_dataset("parquet", data_files=str(out), split="train")
        if fmt == "parquet"
        else datasets.load_from_disk(str(out))
    )
    assert ds.column_names == ["id", "messages", "rank", "ifd", "gain", "iteration"]
    assert ds["id"] == PICK_ORDER and ds["messages"] == [samples[i] for i in PICK_ORDER]
    assert ds["rank"] == [0, 1, 2, 3, 4] and math.isnan(ds["ifd"][2])


def test_iterations_all_and_union_of_a_run(uninterrupted):
    run_dir, _ = uninterrupted
    source = find_source(str(run_dir), None)
    picks = {e: [r["id"] for r in s.read_selection()] for e, s in source.selections.items()}
    assert sorted(picks) == [0, 1]
    assert pick_table(source, "last")["iter_1"].column("id").to_pylist() == picks[1]
    assert pick_table(source, "0")["iter_0"].column("id").to_pylist() == picks[0]
    every = pick_table(source, "all")
    assert {n: t.column("id").to_pylist() for n, t in every.items()} == {
        "iter_0": picks[0],
        "iter_1": picks[1],
    }
    union = pick_table(source, "union")["union"].to_pydict()
    first = picks[0] + [i for i in picks[1] if i not in picks[0]]
    assert union["id"] == first and union["rank"] == list(range(len(first)))
    assert union["iteration"] == [0] * len(picks[0]) + [1] * (len(first) - len(picks[0]))


def test_errors_name_the_fix(ray_local, selection_dir, tmp_path, uninterrupted):
    sel, _ = selection_dir
    source = find_source(None, str(sel))
    with pytest.raises(IteritError, match="cannot hold --format hf"):
        export(source, "hf", str(tmp_path / "x.jsonl"))
    with pytest.raises(IteritError, match="expected one of messages"):
        export(source, "csv", str(tmp_path / "x"))
    with pytest.raises(IteritError, match="no finished selection of that iteration"):
        export(source, "messages", str(tmp_path / "x"), iteration="3")
    with pytest.raises(IteritError, match="not both"):
        find_source(str(tmp_path), str(sel))
    with pytest.raises(IteritError, match="no selection here"):
        find_source(None, str(tmp_path))
    (tmp_path / "taken.jsonl").write_text("")
    with pytest.raises(IteritError, match="does not overwrite"):
        export(source, "messages", str(tmp_path / "taken.jsonl"))
    # A run's selection against another corpus's samples: every pick must be found.
    other = find_source(str(uninterrupted[0]), None)
    mixed = type(source)(source.samples, other.selections)
    with pytest.raises(IteritError, match="are not among the samples"):
        export(mixed, "messages", str(tmp_path / "y.jsonl"), log=lambda *_: None)


def test_the_cli_exports_a_run(uninterrupted, cli, tmp_path):
    run_dir, _ = uninterrupted
    code, out, _ = cli(
        [
            "export",
            str(run_dir),
            "--format",
            "messages",
            "--iteration",
            "all",
            "--output",
            str(tmp_path / "e"),
        ]
    )
    assert code == 0, out
    assert "export iter_1: 6 of 6 picks as messages" in out
    summary = json.loads((tmp_path / "e.export.json").read_text())
    assert set(summary["outputs"]) == {"iter_0", "iter_1"}
    rows = [r for p in sorted((tmp_path / "e" / "iter_1").iterdir()) for r in read_jsonl(p)]
    assert [r["id"] for r in rows] == [
        r["id"] for r in find_source(str(run_dir), None).selections[1].read_selection()
    ]


def test_select_exports_its_picks_and_refuses_a_bad_name_before_selecting(ray_local, cli, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    scores = tmp_path / "scores.jsonl"
    ifd = {"a1": 0.5, "a2": 0.9, "a3": 0.7, "s1": 0.8, "m1": 0.6, "unpicked": 0.1}
    scores.write_text("".join(json.dumps({"id": i, "ifd": v}) + "\n" for i, v in ifd.items()))
    argv = ["select", "--data", corpus, "--scores", scores, "--ratio", "3", "--method", "ifd"]
    code, _, err = cli(
        [*argv, "--output", tmp_path / "o1", "--export", tmp_path / "p.parquet", "--format", "hf"]
    )
    assert code == 2 and "cannot hold --format hf" in err
    assert not (tmp_path / "o1").exists()  # refused before the selection ran
    code, out, err = cli([*argv, "--output", tmp_path / "o", "--export", tmp_path / "p.jsonl"])
    assert code == 0, err
    assert [r["id"] for r in read_jsonl(tmp_path / "p.jsonl")] == ["a2", "s1", "a3"]  # highest IFD first
