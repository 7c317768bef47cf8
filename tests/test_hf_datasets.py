"""Datasets where users keep them: a save_to_disk folder (Dataset or DatasetDict), a local dataset
repository loaded by load_dataset, and a hub id offline. Built locally; no network."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

datasets = pytest.importorskip("datasets")

from iterit.config import DatasetConfig  # noqa: E402
from iterit.data import HFSource, hf_source, ingest, read_samples  # noqa: E402
from iterit.errors import IteritError  # noqa: E402

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
    {"instruction": "Say nothing.", "input": "", "output": "   "},  # empty_response
    {"instruction": "Translate 'chat'.", "input": "French to English", "output": "Cat."},
]
SHAREGPT = [
    {"id": "c1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"id": "c2", "conversations": [{"from": "human", "value": "Only a question"}]},  # no_response
    {"id": "c3", "conversations": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}]},
]


def summary_of(tmp_path, entry: dict, name: str = "ingest"):
    out = tmp_path / name
    summary = ingest([DatasetConfig(**entry)], str(out))
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    return summary, read_samples(summary["samples"]).to_pylist(), rejects


def test_a_save_to_disk_dataset_is_ingested_with_ids_and_rejects(tmp_path):
    folder = tmp_path / "alpaca_disk"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(folder))
    assert hf_source(DatasetConfig(path=str(folder))).kind == "disk"
    summary, samples, rejects = summary_of(tmp_path, {"path": str(folder)})
    assert (summary["read"], summary["accepted"], summary["rejected"]) == (4, 3, 1)
    assert [s["id"] for s in samples] == ["alpaca_disk:train:0", "alpaca_disk:train:1", "alpaca_disk:train:3"]
    assert samples[2]["messages"][-2]["content"] == "Translate 'chat'.\nInput: French to English"
    assert rejects[0]["reason"] == "empty_response" and rejects[0]["row"] == 2
    assert summary["files"][0]["source"] == f"{folder} [train]"


def test_a_save_to_disk_dataset_dict_reads_the_split_asked_for(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(SHAREGPT), "test": datasets.Dataset.from_list(SHAREGPT[:1])}
    ).save_to_disk(str(folder))
    summary, samples, rejects = summary_of(tmp_path, {"path": str(folder)})
    assert (summary["read"], summary["accepted"]) == (3, 2) and [s["id"] for s in samples] == ["c1", "c3"]
    assert rejects[0]["reason"] == "no_response" and rejects[0]["row"] == 1
    summary, samples, _ = summary_of(tmp_path, {"path": str(folder), "split": "test"}, "test")
    assert summary["read"] == 1 and samples[0]["messages"][-1]["content"] == "Hello!"
    with pytest.raises(IteritError, match=r"split 'dev' not in this DatasetDict; its splits: train, test"):
        ingest([DatasetConfig(path=str(folder), split="dev")], str(tmp_path / "dev"))


def test_a_local_dataset_repository_loads_through_load_dataset(tmp_path):
    """The hub's layout on disk: a card declaring the configs and Parquet shards per split."""
    repo = tmp_path / "my-sharegpt"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "  - split: validation\n    path: data/validation-*.parquet\n---\n# my-sharegpt\n"
    )
    rows = [{"conversations": c["conversations"]} for c in SHAREGPT]
    pq.write_table(pa.Table.from_pylist(rows[:2]), repo / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), repo / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), repo / "data" / "validation-00000-of-00001.parquet")
    assert hf_source(DatasetConfig(path=str(repo))) == HFSource("repo", str(repo), "train")
    summary, samples, rejects = summary_of(tmp_path, {"path": str(repo)})
    assert (summary["read"], summary["accepted"], summary["rejected"]) == (3, 2, 1)
    assert [s["id"] for s in samples] == ["my-sharegpt:train:0", "my-sharegpt:train:2"]
    summary, _, _ = summary_of(tmp_path, {"path": str(repo), "split": "validation"}, "val")
    assert summary["read"] == 1
    with pytest.raises(IteritError, match="could not be loaded"):
        ingest([DatasetConfig(path=str(repo), split="nope")], str(tmp_path / "nope"))


def test_a_plain_folder_stays_files_and_a_hub_id_offline_fails_in_one_line(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.jsonl").write_text(json.dumps(ALPACA[0]) + "\n")
    assert hf_source(DatasetConfig(path=str(plain))) is None
    assert hf_source(DatasetConfig(path="data/train.jsonl")) is None  # a missing file is not a hub id
    assert hf_source(DatasetConfig(path="tatsu-lab/alpaca", revision="v1")) == HFSource(
        "hub", "tatsu-lab/alpaca", "train", None, "v1"
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing cached
    with pytest.raises(IteritError) as e:
        ingest([DatasetConfig(path="nobody-here/no-such-dataset")], str(tmp_path / "hub"))
    message = str(e.value)
    assert (
        "\n" not in message and "nobody-here/no-such-dataset" in message and "HF_DATASETS_OFFLINE" in message
    )
    assert not (tmp_path / "hub").exists()  # failed before any output
