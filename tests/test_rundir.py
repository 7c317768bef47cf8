"""The run directory's one owner: paths, the manifest, the selection files and the scores readers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iterit.errors import IteritError
from iterit.rundir import (
    Manifest,
    RunDir,
    ScoreFiles,
    SelectionFiles,
    done_record,
    iter_scores,
    read_scores,
    score_parts,
    stage_name,
)


def test_paths_follow_design_section_3(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.iteration(2) == f"{tmp_path}/iter_2" and stage_name(2, "train") == "iter_2/train"
    assert run.scoring(1).scores == f"{tmp_path}/iter_1/scores"
    assert run.scoring(1).legacy_scores == f"{tmp_path}/iter_1/scores.parquet"
    assert run.selection(0).order == f"{tmp_path}/iter_0/order.parquet"
    assert run.model(3) == f"{tmp_path}/model/iter_3" and run.train_metrics(0).endswith(
        "iter_0/train_metrics.jsonl"
    )
    assert run.eval_json(None).endswith("eval/base.json") and run.eval_dir(1).endswith("eval/iter_1")
    with pytest.raises(ValueError):
        stage_name(0, "scores")
    for e in (0, 2, 10):
        (tmp_path / f"iter_{e}").mkdir()
    (tmp_path / "iter_x").mkdir()
    assert run.iterations_on_disk() == [0, 2, 10]


def test_the_manifest_records_each_stage_once(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(IteritError, match="not an iterit run directory"):
        Manifest.load(run)
    m = Manifest.create(run, seed=7, iterations=2, stages={"ingest": done_record({"accepted": 3})})
    assert run.exists() and Manifest.load(run).data["seed"] == 7
    calls = []
    assert m.run("iter_0/score", lambda: calls.append(1) or {"scored": 3}) == {"scored": 3}
    assert m.run("iter_0/score", lambda: calls.append(1) or {}, log=lambda *_: None) == {"scored": 3}
    assert calls == [1]
    with pytest.raises(RuntimeError):
        m.run("iter_0/select", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert stages["ingest"]["result"] == {"accepted": 3} and stages["iter_0/score"]["status"] == "done"
    assert stages["iter_0/select"]["status"] == "failed" and "boom" in stages["iter_0/select"]["error"]
    assert Manifest.open(run).done("iter_0/score") == {"scored": 3}


def test_the_selection_files_round_trip(tmp_path):
    files = SelectionFiles(str(tmp_path))
    order = ["b", "a", "c", "d"]
    files.write(
        order, np.array([0.2, 0.5, np.nan, np.nan]), ["selected", "selected", "other", "tail"], [0.9, 0.4]
    )
    assert files.read_picks() == ["b", "a"] and files.read_order() == order
    sel = files.read_selection()
    assert sel == [
        {"id": "b", "rank": 0, "ifd": 0.2, "gain": 0.9},
        {"id": "a", "rank": 1, "ifd": 0.5, "gain": 0.4},
    ]
    table = pq.read_table(files.order)
    assert table.column("position").to_pylist() == [0, 1, 2, 3]
    assert table.column("status").to_pylist()[-1] == "tail"


def _part(path, ids, reject):
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "ifd": np.linspace(0.1, 0.9, len(ids)),
                "reject": reject,
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ones(2 * len(ids)), pa.float16()), 2
                ),
            }
        ),
        path,
    )


def test_scores_readers_take_scored_rows_and_only_the_columns_asked(tmp_path):
    files = ScoreFiles(str(tmp_path))
    (tmp_path / "scores").mkdir()
    _part(tmp_path / "scores" / "b.parquet", ["c", "d"], ["", "template_error"])
    _part(tmp_path / "scores" / "a.parquet", ["a", "b"], ["", ""])
    assert [p.rsplit("/", 1)[1] for p in score_parts(files.scores)] == ["a.parquet", "b.parquet"]
    assert files.written == files.scores
    got = files.read(["id", "ifd"])
    assert got.column_names == ["id", "ifd"] and got.column("id").to_pylist() == ["a", "b", "c"]
    everything = [t.num_rows for t in iter_scores(files.scores, ["id"], scored_only=False)]
    assert everything == [2, 2]  # part by part, rejects included when asked
    assert read_scores(files.scores, ["id", "embedding"]).column("embedding").type.value_type == pa.float16()

    # a run made before scores were a folder: one scores.parquet of scored rows
    old = ScoreFiles(str(tmp_path / "old"))
    (tmp_path / "old").mkdir()
    pq.write_table(pa.table({"id": ["x"], "ifd": [0.3], "loss_cond": [1.0]}), old.legacy_scores)
    assert old.written == old.legacy_scores and old.read(["id", "ifd"]).to_pylist() == [
        {"id": "x", "ifd": 0.3}
    ]
    with pytest.raises(IteritError, match="scores not found"):
        read_scores(str(tmp_path / "none"))


def test_select_reads_a_scores_folder(tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "instruction": "q", "output": f"answer {i}"}) + "\n" for i in "abcd")
    )
    (tmp_path / "scores").mkdir()
    _part(tmp_path / "scores" / "0.parquet", ["a", "b"], ["", ""])
    _part(tmp_path / "scores" / "1.parquet", ["c", "d"], ["", "response_truncated"])
    code, out, err = cli(
        [
            "select",
            "--data",
            data,
            "--scores",
            tmp_path / "scores",
            "--ratio",
            "2",
            "--method",
            "ifd",
            "--output",
            tmp_path / "o",
        ]
    )
    assert code == 0, err
    picks = [json.loads(line)["id"] for line in open(tmp_path / "o" / "selection.jsonl")]
    # ifd a 0.1, b 0.9, c 0.1; d (0.9) was rejected at scoring: never a candidate
    assert picks == ["b", "a"] and "1 without a score" in out


def test_a_model_folder_on_object_storage_is_copied_once_and_again_when_rewritten(tmp_path, monkeypatch):
    import os
    import tempfile

    import fsspec

    from iterit.io import local_copy

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's copies only

    fs = fsspec.filesystem("memory")
    fs.pipe({"/m/config.json": b'{"a": 1}', "/m/sub/weights.bin": b"w1"})
    first = local_copy("memory://m")
    assert open(os.path.join(first, "config.json")).read() == '{"a": 1}'
    assert open(os.path.join(first, "sub", "weights.bin")).read() == "w1"
    assert local_copy("memory://m") == first  # the same version: the one copy
    fs.pipe({"/m/config.json": b'{"a": 22}'})  # written again: another version
    again = local_copy("memory://m")
    assert again != first and open(os.path.join(again, "config.json")).read() == '{"a": 22}'
    assert local_copy("/a/local/folder") == "/a/local/folder" and local_copy("org/hub-id") == "org/hub-id"
    # a third model: the node keeps the two newest copies (each iteration's export would pile up)
    fs.pipe({"/m3/config.json": b"{}"})
    third = local_copy("memory://m3")
    assert os.path.isdir(third) and os.path.isdir(again) and not os.path.exists(first)
