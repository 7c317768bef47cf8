"""Hashed TF-IDF built on the cluster (iterit.selection.shards): row for row, bit for bit the in-memory
hashed rows, and the greedy over its memory-mapped shards picks what the in-memory greedy picks."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iterit.data import SAMPLE_SCHEMA
from iterit.selection.greedy import lazy_greedy_coded
from iterit.selection.pipeline import build_shards
from iterit.selection.shards import sharded_rows, task_groups
from iterit.selection.tfidf import hashed_rows, response_texts

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def samples(tmp_path_factory, real_responses):
    texts = real_responses[:500]
    rows = [
        {
            "id": f"s{i}",
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": t}],
            "source": "t",
            "row": i,
        }
        for i, t in enumerate(texts)
    ]
    path = tmp_path_factory.mktemp("shards") / "samples.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), path, row_group_size=37)
    ifd = np.random.default_rng(0).uniform(0.3, 1.3, len(texts))
    ifd[::50] = np.nan  # rejected while scoring
    return str(path), texts, ifd


def candidates(ifd: np.ndarray, window: np.ndarray):
    """select_window's candidates of a window (positions of the samples file, in window order): the
    candidate number of each file row (-1: not one), their IFDs, their file rows in window order."""
    w_ifd = ifd[window]
    cand = np.flatnonzero(np.isfinite(w_ifd) & (w_ifd < 1))
    cand_of_row = np.full(len(ifd), -1, dtype=np.int64)
    cand_of_row[window[cand]] = np.arange(cand.size)
    return cand_of_row, w_ifd[cand], window[cand]


def test_task_groups_cover_every_row_group_once(samples):
    path, texts, _ = samples
    tasks = task_groups(path, rows_per_task=100)
    groups = [g for t in tasks for g in t["groups"]]
    assert groups == list(range(pq.ParquetFile(path).metadata.num_row_groups)) and len(tasks) == 5
    assert tasks[0]["offset"] == 0 and tasks[1]["offset"] == 37 * 3  # 3 groups of 37 reach 100 rows


def same_rows(got, want) -> bool:
    """Every candidate's columns and counts, norm and initial score bit for bit, and the idf."""
    n = len(want.initial)
    if len(got.initial) != n or not np.array_equal(got.idf, want.idf):
        return False
    if not (np.array_equal(got.norms, want.norms) and np.array_equal(got.initial, want.initial)):
        return False
    return all(all(np.array_equal(a, b) for a, b in zip(got.row(c), want.row(c))) for c in range(n))


@pytest.mark.parametrize("order", ["file", "shuffled"])
def test_sharded_rows_and_picks_equal_the_in_memory_hashed_rows(samples, tmp_path, ray_local, order):
    path, texts, ifd = samples
    window = np.arange(len(texts)) if order == "file" else np.random.default_rng(1).permutation(len(texts))
    cand_of_row, c_ifd, rows_in_order = candidates(ifd, window)
    record = build_shards(
        path, cand_of_row, c_ifd, str(tmp_path / "tfidf"), EOS, rows_per_task=100, log=print
    )
    assert record["candidates"] == c_ifd.size and record["shards"] == 5

    mem = hashed_rows(response_texts([texts[r] for r in rows_in_order], EOS), c_ifd, workers=1)
    rows = sharded_rows(str(tmp_path / "tfidf"), c_ifd.size)
    assert record["nnz"] == sum(rows.row(c)[0].size for c in range(c_ifd.size))
    assert same_rows(rows, mem)

    k = 40
    want = lazy_greedy_coded(c_ifd, mem, k, 0.1)
    calls = []
    got = lazy_greedy_coded(c_ifd, rows, k, 0.1, calls.append)
    assert got == want and len(got[0]) == k and sum(calls) == k  # progress counts every pick


def test_an_interrupted_build_completes_what_is_missing(samples, tmp_path, ray_local):
    import shutil

    from iterit.selection.shards import count_shard

    path, texts, ifd = samples
    cand_of_row, c_ifd, _ = candidates(ifd, np.arange(len(texts)))
    out = tmp_path / "tfidf"
    first = build_shards(path, cand_of_row, c_ifd, str(out), EOS, rows_per_task=100, log=print)
    want = sharded_rows(str(out), c_ifd.size)
    tasks = task_groups(path, 100)

    def killed(shards_counted: list[str], weighted: list[str]):
        """OUT as a driver killed mid-build leaves it: those shards counted, those weighted."""
        os.remove(out / "done.json")
        shutil.rmtree(out / "rows")
        shutil.rmtree(out / "weights")
        for t in tasks:
            if t["shard"] in shards_counted + weighted:
                count_shard(t, path, str(out), cand_of_row, EOS)
        if weighted:
            for s in weighted:
                shutil.copytree(tmp_path / "weights-done" / s, out / "weights" / s)
        else:
            os.remove(out / "idf.npy")
        os.makedirs(out / "rows" / "000004", exist_ok=True)  # a shard begun but not complete
        (out / "rows" / "000004" / "codes.npy").write_bytes(b"half")
        os.makedirs(out / "weights" / "000001", exist_ok=True)
        (out / "weights" / "000001" / "norms.npy").write_bytes(b"half")

    shutil.copytree(out / "weights", tmp_path / "weights-done")
    for counted, weighted in (
        (["000000", "000002"], []),
        (["000001"], ["000000", "000002", "000003"]),
    ):
        killed(counted, weighted)
        again = build_shards(path, cand_of_row, c_ifd, str(out), EOS, rows_per_task=100, log=print)
        assert again == first
        assert same_rows(sharded_rows(str(out), c_ifd.size), want)


def test_a_folder_built_for_other_candidates_is_rebuilt_not_reused(samples, tmp_path, ray_local):
    """`iterit select` rerun into the same --output with other scores: a finished (or half-built) folder
    of other inputs must not hand back its rows."""
    path, texts, ifd = samples
    out, lines = str(tmp_path / "tfidf"), []
    cand_of_row, c_ifd, _ = candidates(ifd, np.arange(len(texts)))
    build_shards(path, cand_of_row, c_ifd, out, EOS, rows_per_task=100, log=lines.append)
    other = ifd.copy()
    other[:40] = 1.5  # 40 samples fewer are candidates
    cand2, c_ifd2, _ = candidates(other, np.arange(len(texts)))
    record = build_shards(path, cand2, c_ifd2, out, EOS, rows_per_task=100, log=lines.append)
    assert record["candidates"] == c_ifd2.size < c_ifd.size
    assert any("built for other candidates: rebuilt" in line for line in lines)
    rows = sharded_rows(out, c_ifd2.size)
    mem = hashed_rows(response_texts([texts[r] for r in np.flatnonzero(cand2 >= 0)], EOS), c_ifd2, workers=1)
    assert same_rows(rows, mem)
    same_ifd_other_value = c_ifd2.copy()
    same_ifd_other_value[0] += 0.01  # the same candidates, one IFD changed: the initial scores differ
    again = build_shards(path, cand2, same_ifd_other_value, out, EOS, rows_per_task=100, log=lines.append)
    assert again == record and sharded_rows(out, c_ifd2.size).initial[0] == pytest.approx(
        rows.initial[0] * same_ifd_other_value[0] / c_ifd2[0]
    )
    n_rebuilt = sum("rebuilt" in line for line in lines)
    build_shards(path, cand2, same_ifd_other_value, out, EOS, rows_per_task=100, log=lines.append)
    assert sum("rebuilt" in line for line in lines) == n_rebuilt  # the same inputs: reused


def test_a_later_window_selects_as_in_memory(samples, tmp_path, ray_local):
    """diversity_inputs maps a window (a subset of the corpus in another order, as iteration e > 0
    re-orders) to the cluster's rows; select_window then orders it as the in-memory hashed matrix does."""
    from iterit.selection.stage import diversity_inputs
    from iterit.selection.window import select_window

    path, texts, ifd = samples
    window_rows = np.random.default_rng(2).permutation(len(texts))[:300]
    w_ifd = ifd[window_rows]
    work = str(tmp_path / "tfidf")
    div = diversity_inputs(path, window_rows, w_ifd, "iterit", "hashed", work, EOS, log=print)
    assert set(div) == {"tfidf_rows"}
    got = select_window(w_ifd, 30, "iterit", **div)
    want = select_window(
        w_ifd, 30, "iterit", responses=[texts[r] for r in window_rows], eos_token=EOS, tfidf_mode="hashed"
    )
    assert (got.order, got.status, got.gains) == (want.order, want.status, want.gains)
    assert diversity_inputs(path, window_rows, w_ifd, "iterit", "exact", work, EOS)["responses"][:3] == [
        texts[r] for r in window_rows[:3]
    ]
    assert diversity_inputs(path, window_rows, w_ifd, "ifd", "hashed", work, EOS) == {}


def test_select_command_with_hashed_tfidf_on_the_cluster(samples, tmp_path, ray_local, cli):
    """`iterit select --tfidf hashed`: the rows are built by the cluster, removed after; the picks are the
    in-memory hashed matrix's."""
    from iterit.rundir import SelectionFiles
    from iterit.selection.window import select_window

    path, texts, ifd = samples
    scores = tmp_path / "scores.jsonl"
    scores.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "ifd": float(x)}) + "\n" for i, x in enumerate(ifd) if np.isfinite(x)
        )
    )
    code, out, err = cli(["select", "--data", path, "--scores", str(scores), "--ratio", "0.05", "--tfidf", "hashed", "--output", str(tmp_path / "sel")])  # fmt: skip
    assert code == 0, err
    assert "TF-IDF on the cluster" in out and not os.path.exists(tmp_path / "sel" / "tfidf")
    got = [r["id"] for r in SelectionFiles(str(tmp_path / "sel")).read_selection()]
    want = select_window(ifd, int(0.05 * len(ifd)), "iterit", responses=texts, tfidf_mode="hashed")
    assert got == [f"s{p}" for p in want.picks]


def test_pick_progress_only_for_long_greedy_selections(capsys):
    from iterit.selection.stage import PROGRESS_MIN_PICKS, pick_progress

    with pick_progress(PROGRESS_MIN_PICKS - 1, "iterit") as short, pick_progress(10**6, "ifd") as sort:
        assert short is None and sort is None
    with pick_progress(PROGRESS_MIN_PICKS, "iterit") as on_picks:
        for _ in range(10):
            on_picks(PROGRESS_MIN_PICKS // 10)
    err = capsys.readouterr().err
    assert "iterit greedy" in err and f"{PROGRESS_MIN_PICKS}/{PROGRESS_MIN_PICKS}" in err
    with pick_progress(PROGRESS_MIN_PICKS, "embedding") as on_picks:
        on_picks(PROGRESS_MIN_PICKS)
    assert "embedding greedy" in capsys.readouterr().err
