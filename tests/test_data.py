import gzip
import io
import json
import tracemalloc

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import BIG_OUTPUT, GOOD_ALPACA

from iterit.config import DatasetConfig
from iterit.data import REJECT_REASONS, expand_paths, ingest, normalise, read_records, read_samples
from iterit.errors import IteritError, RowError

SYS = {"role": "system", "content": "You are a helpful assistant."}
AUTO = DatasetConfig(path="x")


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ---- normalisation, one format at a time (docs/architecture.md section 2)


def test_alpaca_without_and_with_input():
    assert normalise({"instruction": "Add.", "output": "3"}, AUTO) == [
        SYS,
        {"role": "user", "content": "Add."},
        {"role": "assistant", "content": "3"},
    ]
    assert normalise({"instruction": "Add.", "input": "1 and 2", "output": "3"}, AUTO)[1] == {
        "role": "user",
        "content": "Add.\nInput: 1 and 2",
    }
    assert normalise({"instruction": "Add.", "input": None, "output": "3"}, AUTO)[1]["content"] == "Add."


def test_sharegpt_keeps_context_and_drops_turns_after_last_answer():
    rec = {
        "conversations": [
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "chatgpt", "value": "A2"},
            {"from": "human", "value": "unanswered follow-up"},
        ]
    }
    assert normalise(rec, AUTO) == [
        SYS,
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]


def test_messages_keep_their_system_prompt_and_join_text_parts():
    rec = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
            {"role": "assistant", "content": "4"},
        ]
    }
    assert normalise(rec, AUTO) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert normalise(rec, AUTO, system_prompt=None)[0]["content"] == "Be terse."
    assert normalise({"instruction": "x", "output": "y"}, AUTO, system_prompt=None)[0]["role"] == "user"


def test_a_rows_own_system_field_replaces_the_default_prompt_but_not_a_system_turn():
    alpaca = {"instruction": "x", "output": "y", "system": "Row prompt."}
    assert normalise(alpaca, AUTO)[0] == {"role": "system", "content": "Row prompt."}
    assert normalise(alpaca, AUTO, system_prompt=None)[0] == {"role": "system", "content": "Row prompt."}
    sharegpt = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        "system": "",
    }
    assert normalise(sharegpt, AUTO)[0]["content"] == "You are a helpful assistant."  # empty: the default
    turn = {"messages": [{"role": "system", "content": "Turn."}, {"role": "user", "content": "q"}]}
    turn["messages"].append({"role": "assistant", "content": "a"})
    assert normalise({**turn, "system": "Field."}, AUTO)[0]["content"] == "Turn."
    mapped = DatasetConfig(path="x", field_system="system_prompt")
    assert normalise({"instruction": "x", "output": "y", "system_prompt": "P."}, mapped)[0]["content"] == "P."
    with pytest.raises(RowError) as e:
        normalise({"instruction": "x", "output": "y", "system": 3}, AUTO)
    assert e.value.reason == "wrong_type" and "'system' is" in e.value.detail


def test_field_mapping_and_forced_type():
    ds = DatasetConfig(path="x", type="alpaca", field_instruction="prompt", field_output="completion")
    assert normalise({"prompt": "p", "completion": "c"}, ds)[-1] == {"role": "assistant", "content": "c"}
    with pytest.raises(RowError) as e:
        normalise({"instruction": "p", "output": "c"}, ds)
    assert e.value.reason == "missing_field" and "'prompt'" in e.value.detail


@pytest.mark.parametrize(
    "rec,reason",
    [
        ({"instruction": "x", "output": 3}, "wrong_type"),
        ({"instruction": "x", "output": None}, "missing_field"),
        ({"instruction": "x", "output": ""}, "empty_response"),
        ({"conversations": [{"from": "gpt", "value": "  "}]}, "empty_response"),
        ({"conversations": [{"from": "human", "value": "hi"}, "oops"]}, "wrong_type"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "image_url"}]},
                ]
            },
            "wrong_type",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "bad_role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no_response"),
        ({"instruction": "x", "output": "bad \udcff byte"}, "bad_encoding"),
        ("a string row", "wrong_type"),
    ],
)
def test_bad_rows_raise_a_reason_from_the_vocabulary(rec, reason):
    with pytest.raises(RowError) as e:
        normalise(rec, AUTO)
    assert e.value.reason == reason and reason in REJECT_REASONS


# ---- the ingest stage on hostile input


def test_hostile_corpus_accepted_plus_rejected_equals_read(hostile_corpus, tmp_path):
    src, expected = hostile_corpus
    summary = ingest([DatasetConfig(path=str(src))], str(tmp_path / "out"))
    per_file = {f["source"].rsplit("/", 1)[-1]: f for f in summary["files"]}
    assert set(per_file) == set(expected)
    for name, (read, accepted, reasons) in expected.items():
        f = per_file[name]
        assert (f["read"], f["accepted"], f["by_reason"]) == (read, accepted, reasons), name
        assert f["accepted"] + f["rejected"] == f["read"]

    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert len(rejects) == summary["rejected"] == 13
    assert all(r["reason"] in REJECT_REASONS and r["detail"] for r in rejects)
    by_row = {(r["source"].rsplit("/", 1)[-1], r["row"]): r for r in rejects}
    assert by_row[("rows.jsonl", 1)]["detail"].startswith("line 2,")
    assert by_row[("rows.jsonl", 6)]["id"] == "dup" and "rows.jsonl:5" in by_row[("rows.jsonl", 6)]["detail"]
    assert "byte 0xe9" in by_row[("rows.jsonl", 7)]["detail"]
    assert "line 3" in by_row[("array.json", 1)]["detail"]

    # The good rows come through unchanged, with default and explicit ids.
    table = read_samples(summary["samples"])
    assert table.num_rows == summary["accepted"] == 7
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {"rows:0", "dup", "rows:8", "rows:13", "array:0", "array:2", "array:4"}
    assert rows["rows:0"]["messages"] == [
        SYS,
        {"role": "user", "content": GOOD_ALPACA["instruction"]},
        {"role": "assistant", "content": GOOD_ALPACA["output"]},
    ]
    assert rows["rows:8"]["messages"][-1]["content"] == BIG_OUTPUT
    assert rows["dup"]["messages"][1]["content"] == "first"
    assert [m["role"] for m in rows["rows:13"]["messages"]] == ["system", "user", "assistant"]
    assert rows["array:4"]["row"] == 4 and rows["array:4"]["source"].endswith("array.json")
    saved = json.load(open(tmp_path / "out" / "summary.json"))
    assert saved["read"] == saved["accepted"] + saved["rejected"] == 20


def test_no_valid_rows_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": 1, "output": 2}\nnot json\n')
    with pytest.raises(
        IteritError, match=r"no valid rows in .*bad\.jsonl \(2 read; .*\); see .*rejects\.jsonl"
    ):
        ingest([DatasetConfig(path=str(bad))], str(tmp_path / "out"))
    assert len(read_jsonl(tmp_path / "out" / "rejects.jsonl")) == 2


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda d: str(d / "missing.jsonl"), "data path not found"),
        (lambda d: (d / "notes.txt").write_text("x") and str(d / "notes.txt"), "unknown data format"),
        (lambda d: str(d / "*.jsonl"), "no files match"),
        (lambda d: (d / "sub").mkdir() or str(d / "sub"), "no data files in directory"),
    ],
)
def test_bad_paths_are_clear_errors(tmp_path, make, pattern):
    with pytest.raises(IteritError, match=pattern):
        expand_paths(make(tmp_path))


# ---- JSON arrays: truncated, compact with a bad element


def test_truncated_array_keeps_complete_elements(tmp_path):
    p = tmp_path / "cut.json"
    full = json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)], indent=2)
    p.write_text(full[: full.rindex('"a4"') + 2])  # cut inside the last element, like ShareGPT V3
    rows = list(read_records(str(p)))
    assert [r for _, r in rows[:4]] == [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    assert isinstance(rows[4][1], RowError) and rows[4][1].detail.endswith("the file ends inside it")
    assert len(rows) == 5


def test_compact_array_resyncs_after_a_bad_element(tmp_path):
    p = tmp_path / "compact.json"
    p.write_text(
        '[{"instruction":"a","output":"A"},{"instruction":"b","output":oops},'
        '{"instruction":"c","output":"C"}]'
    )
    rows = list(read_records(str(p)))
    assert [type(r).__name__ for _, r in rows] == ["dict", "RowError", "dict"]
    assert rows[2] == (2, {"instruction": "c", "output": "C"})


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_array_elements_straddle_read_chunks(chunk):
    from iterit.data import _read_json_values

    elems = [{"instruction": "q", "output": "x" * 5000}, {"instruction": "r", "output": 12345678}]
    bad = json.dumps(elems, indent=1).replace('"r"', "r")  # second element broken
    assert [r for _, r in _read_json_values(io.StringIO(json.dumps(elems)), chunk)] == elems
    got = [r for _, r in _read_json_values(io.StringIO(bad), chunk)]
    assert got[0] == elems[0] and isinstance(got[1], RowError) and len(got) == 2


# ---- sources: fsspec URIs, compression, Parquet, globs, colliding stems


def test_fsspec_memory_filesystem_glob_and_gzip(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.jsonl", b'{"instruction": "x", "output": "y"}\n')
    fs.pipe(
        "/corpus/b.jsonl.gz",
        gzip.compress(
            b'{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}\n'
        ),
    )
    assert expand_paths("memory://corpus/*") == ["memory:///corpus/a.jsonl", "memory:///corpus/b.jsonl.gz"]
    summary = ingest([DatasetConfig(path="memory://corpus")], "memory://out")
    assert (summary["read"], summary["accepted"]) == (2, 2)
    with fs.open("/out/samples.parquet", "rb") as f:
        assert pq.read_table(f).column("id").to_pylist() == ["a:0", "b:0"]
    assert not [p for p in fs.find("/out") if ".tmp-" in p]  # temporary names renamed away


def test_parquet_input_and_stem_collisions(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "train.jsonl").write_text('{"instruction": "i", "output": "o"}\n')
    first = ingest([DatasetConfig(path=str(tmp_path / "*" / "train.jsonl"))], str(tmp_path / "o1"))
    ids = read_samples(first["samples"]).column("id").to_pylist()
    assert ids == ["x/train:0", "y/train:0"]  # same stem in two folders: ids still unique
    # The normalised Parquet is itself a valid `messages` input (system turn already first).
    second = ingest([DatasetConfig(path=first["samples"])], str(tmp_path / "o2"))
    assert (
        read_samples(second["samples"]).column("messages").to_pylist()
        == read_samples(first["samples"]).column("messages").to_pylist()
    )
    assert read_samples(second["samples"]).column("id").to_pylist() == ids


def test_ingest_memory_does_not_grow_with_the_file(tmp_path):
    """Streaming: rows are held one Parquet row group at a time. What grows with the file is only the
    duplicate-id index (~100 bytes per id), not the ~1,100 bytes of text per row."""
    row = json.dumps({"instruction": "Summarise the text.", "output": "lorem ipsum dolor sit amet " * 40})
    peaks = []
    for n in (9_000, 36_000):
        p = tmp_path / f"big{n}.jsonl"
        p.write_text((row + "\n") * n)
        tracemalloc.start()
        summary = ingest([DatasetConfig(path=str(p))], str(tmp_path / f"out{n}"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert summary["accepted"] == n
    assert p.stat().st_size > 40e6
    per_extra_row = (peaks[1] - peaks[0]) / 27_000
    assert per_extra_row < 250 and peaks[1] < p.stat().st_size / 3, peaks


def test_ray_data_reads_the_samples_contract(hostile_corpus, tmp_path, ray_local):
    import ray

    src, _ = hostile_corpus
    summary = ingest([DatasetConfig(path=str(src / "array.json"))], str(tmp_path / "out"))
    ds = ray.data.read_parquet(summary["samples"])
    assert ds.count() == 3
    assert ds.schema().names == ["id", "messages", "source", "row"]
    assert sorted(r["id"] for r in ds.take_all()) == ["array:0", "array:2", "array:4"]


def test_json_files_holding_lines_or_one_object(tmp_path):
    lines = tmp_path / "lines.json"  # JSON Lines with a .json name, one line broken
    lines.write_text(
        '{"instruction": "a", "output": "A"}\n{"instruction": "b", "output": \n'
        '{"instruction": "c", "output": "C"}\n'
    )
    rows = list(read_records(str(lines)))
    assert [type(r).__name__ for _, r in rows] == ["dict", "RowError", "dict"] and rows[2][0] == 2
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"instruction": "pretty", "output": "printed"}, indent=2))
    assert list(read_records(str(one))) == [(0, {"instruction": "pretty", "output": "printed"})]


def test_corrupt_compressed_and_parquet_files_end_with_one_reject(tmp_path):
    good = "".join(
        json.dumps({"instruction": f"q{i}", "output": f"answer {i * 7919 % 1000}"}) + "\n" for i in range(200)
    ).encode()
    packed = gzip.compress(good)
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(packed[: len(packed) * 2 // 3])  # an upload cut short
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    summary = ingest([DatasetConfig(path=str(tmp_path))], str(tmp_path / "out"))
    files = {f["source"].rsplit("/", 1)[-1]: f for f in summary["files"]}
    assert files["bad.parquet"]["by_reason"] == {"unreadable_file": 1}
    cut = files["cut.jsonl.gz"]
    assert cut["by_reason"].pop("unreadable_file") == 1 and 50 < cut["accepted"] < 200
    assert cut["by_reason"] in ({}, {"invalid_json": 1})  # the line the cut fell in, if any
    assert cut["read"] == cut["accepted"] + cut["rejected"]
    rejects = [r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl") if r["reason"] == "unreadable_file"]
    assert len(rejects) == 2 and all(
        r["row"] is None and r["detail"].startswith("reading stopped") for r in rejects
    )


def test_max_samples_reads_only_the_first_rows(tmp_path):
    from iterit.data import ingest

    f = tmp_path / "rows.jsonl"
    f.write_text(
        "".join(
            json.dumps({"instruction": f"q{i}", "output": "a" if i != 1 else ""}) + "\n" for i in range(10)
        )
    )
    s = ingest([DatasetConfig(path=str(f), max_samples=4)], str(tmp_path / "out"))
    assert (s["read"], s["accepted"], s["rejected"]) == (4, 3, 1)  # row 1 is an empty response
    assert read_samples(s["samples"]).column("id").to_pylist() == ["rows:0", "rows:2", "rows:3"]
