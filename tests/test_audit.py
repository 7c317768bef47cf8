"""iterit audit: the noise it injects, the figures it counts (stub scores with known answers), and the
whole command on the tiny model, checked against the files it leaves."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from iterit.audit import (
    CLEAN,
    SAME_RESPONSE_GROUP,
    across_seeds,
    interval,
    noise_plan,
    noisy_messages,
    parse_noise,
    perturb,
    seed_figures,
    truncate,
)
from iterit.errors import IteritError
from iterit.rundir import RunDir, SelectionFiles, read_scores


def test_parse_noise_reads_kinds_and_names_what_is_wrong():
    assert parse_noise("mismatch=0.1, duplicate=0") == {"mismatch": 0.1, "duplicate": 0.0}
    assert set(parse_noise(None)) == {"mismatch", "duplicate", "near_duplicate", "truncated", "same_response"}
    with pytest.raises(IteritError, match="unknown kind 'typo'"):
        parse_noise("typo=0.1")
    with pytest.raises(IteritError, match="mismatch=0.05"):
        parse_noise("mismatch")
    with pytest.raises(IteritError, match="KIND=FRACTION"):
        parse_noise("mismatch=2")
    with pytest.raises(IteritError, match="injects nothing"):
        parse_noise("mismatch=0")


def test_noise_plan_counts_partners_and_groups():
    plan = noise_plan(200, {"mismatch": 0.1, "duplicate": 0.05, "same_response": 0.125}, seed=3)
    kinds = [k for k, _, _ in plan]
    assert (
        kinds.count("mismatch") == 20
        and kinds.count("duplicate") == 10
        and kinds.count("same_response") == 25
    )
    assert all(s != p for k, s, p in plan if k == "mismatch")  # never its own response
    assert all(s == p for k, s, p in plan if k == "duplicate")
    shared = [p for k, _, p in plan if k == "same_response"]
    assert [shared.count(p) for p in dict.fromkeys(shared)] == [SAME_RESPONSE_GROUP, SAME_RESPONSE_GROUP, 5]
    assert noise_plan(200, {"mismatch": 0.1}, seed=3) == [r for r in plan if r[0] == "mismatch"]  # seeded
    assert noise_plan(200, {"mismatch": 0.1}, seed=4) != noise_plan(200, {"mismatch": 0.1}, seed=3)


def test_noisy_rows_are_what_their_kind_says():
    rng = np.random.default_rng(0)
    text = "The quick brown fox jumps over the lazy dog. It then runs away, fast, into the woods."
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": text},
    ]
    other = [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "Another answer."}]
    mism = noisy_messages("mismatch", conv, other, rng)
    assert mism[:2] == conv[:2] and mism[-1] == {"role": "assistant", "content": "Another answer."}
    assert noisy_messages("duplicate", conv, conv, rng) == conv
    cut = truncate(text, rng)
    assert text.startswith(cut) and 0.2 * len(text) < len(cut) < 0.7 * len(text) and cut[-1] not in ".!?,;:"
    for _ in range(20):
        near = perturb(text, rng)
        squash = lambda t: " ".join(t.lower().replace(",", "").replace(".", "").split())  # noqa: E731
        assert near != text and squash(near) == squash(text)


def _figures():
    """10 clean rows (ifd 0.1 .. 1.0), 4 mismatches (two at IFD >= 1), 2 duplicates of rows 0 and 1."""
    kind = np.array([CLEAN] * 10 + ["mismatch"] * 4 + ["duplicate"] * 2, dtype=object)
    ifd = np.array([0.1 * (i + 1) for i in range(10)] + [0.95, 0.99, 1.2, 1.5] + [0.1, 0.2])
    ifd[9] = np.nan  # a clean row rejected at scoring
    source = np.array([-1] * 14 + [0, 1])
    picks = {"a": [np.array([0, 1, 10, 14])], "b": [np.array([2, 3, 4, 5])]}
    return seed_figures(kind, ifd, picks, source)


def test_seed_figures_count_shares_ratios_and_copies():
    f = _figures()
    assert f["kinds"][CLEAN] == {
        "rows": 10,
        "scored": 9,
        "removed": 0,
        "candidates": 9,
        "expected": 9 / 15,
        "ifd_quantiles": pytest.approx(
            np.quantile([0.1 * (i + 1) for i in range(9)], [0.1, 0.25, 0.5, 0.75, 0.9])
        ),
    }
    assert (f["kinds"]["mismatch"]["removed"], f["kinds"]["mismatch"]["expected"]) == (2, 4 / 15)
    a = f["methods"]["a"][0]
    assert a["share"] == {CLEAN: 0.5, "mismatch": 0.25, "duplicate": 0.25}
    assert a["ratio"]["mismatch"] == pytest.approx(0.25 / (4 / 15))
    assert a["noise_share"] == 0.5
    assert a["with_original"] == {"duplicate": 1.0}  # row 14 is a copy of row 0, picked too
    # of the rows under IFD 1: mismatches at 0.95 and 0.99, one picked; 2 of 9 clean; 1 of 2 copies
    assert a["of_candidates"] == {CLEAN: pytest.approx(2 / 9), "mismatch": 0.5, "duplicate": 0.5}
    two = seed_figures(np.array([CLEAN] * 4, dtype=object), np.full(4, 0.5), {"a": [[0, 1], [1, 2]]})
    assert two["methods"]["a"][1]["kept_from_iteration_0"] == 0.5  # row 1 of rows 1, 2 was picked before
    b = f["methods"]["b"][0]
    assert b["ratio"][CLEAN] == pytest.approx(1 / (9 / 15)) and b["with_original"] == {"duplicate": None}


def test_across_seeds_gives_t_intervals_of_the_per_seed_values():
    s = interval([0.5, 0.6, 0.7])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert s["mean"] == pytest.approx(0.6) and s["low"] == pytest.approx(0.6 - half)
    assert s["high"] == pytest.approx(0.6 + half)
    assert interval([0.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "values": [0.5]}
    clipped = interval([0.0, 0.0, 0.9], top=1)  # shares stay in [0, 1]
    assert (clipped["low"], clipped["high"]) == (0.0, 1.0) and clipped["mean"] == pytest.approx(0.3)
    assert interval([None, None])["mean"] is None
    one = _figures()
    summary = across_seeds([one, one])
    assert summary["methods"]["a"][0]["share"]["mismatch"]["mean"] == 0.25
    assert summary["kinds"]["mismatch"]["removed_share"]["mean"] == 0.5


# --------------------------------------------------------------------------------------------
# The command on the tiny model


@pytest.fixture(scope="module")
def audited(ray_local, tiny_run_config, loop_corpus, tmp_path_factory, cli_module):
    """`iterit audit` on the 60-row corpus: 2 seeds, 4 methods, 10% of each kind of noise."""
    tmp = tmp_path_factory.mktemp("audit")
    config = tmp / "audit.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(loop_corpus, tmp / "run", selection={"ratio": 0.1})))
    out = tmp / "out"
    argv = ["audit", config, "--seeds", "1,2", "--methods", "iterit,ifd,random,longest", "--output", out]
    argv += ["--noise", "mismatch=0.1,duplicate=0.1,near_duplicate=0.1,truncated=0.1,same_response=0.2"]
    code, stdout = cli_module(argv)
    assert code == 0, stdout[-3000:]
    return out, config, stdout


@pytest.fixture(scope="module")
def cli_module():
    import contextlib
    import io

    from conftest import iterit_main

    def run(argv):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = iterit_main(argv)
        return code, buf.getvalue()

    return run


def test_audit_writes_tables_and_plots_that_agree_with_the_per_seed_files(audited):
    out, _, stdout = audited
    data = json.loads((out / "audit.json").read_text())
    assert (out / "audit.md").read_text().startswith("# Noise audit")
    assert (out / "audit_shares.png").stat().st_size > 1000 and (out / "audit_ifd.png").stat().st_size > 1000
    assert data["clean_samples"] == 60 and data["injected"] == 6 + 6 + 6 + 6 + 12
    pool_n = 60 + data["injected"]
    assert data["k"] == math.floor(0.1 * pool_n)
    for seed, per_seed in zip((1, 2), data["per_seed"]):
        labels = pq.read_table(out / f"seed_{seed}" / "noise" / "labels.parquet").to_pylist()
        kind_of = {r["id"]: r["kind"] for r in labels}
        pool = RunDir(str(out / f"seed_{seed}" / "pool"))
        scores = read_scores(pool.scoring(0).written, ["id", "ifd"]).to_pylist()
        assert len(scores) == len({r["id"] for r in scores}) <= pool_n
        assert per_seed["kinds"][CLEAN]["rows"] == 60  # every accepted row, scored or rejected at scoring
        for kind, n in (("mismatch", 6), ("same_response", 12)):
            assert per_seed["kinds"][kind]["rows"] == n
            ifds = [r["ifd"] for r in scores if kind_of.get(r["id"]) == kind]
            assert per_seed["kinds"][kind]["removed"] == sum(v >= 1 for v in ifds)
        for method in ("iterit", "ifd", "random", "longest"):
            picks = SelectionFiles(str(out / f"seed_{seed}" / "select" / method)).read_picks()
            assert len(picks) == data["k"]
            noisy = sum(p in kind_of for p in picks) / len(picks)
            assert per_seed["methods"][method][0]["noise_share"] == pytest.approx(noisy)
            if method in ("iterit", "ifd"):  # never a row at IFD >= 1
                ifd_of = {r["id"]: r["ifd"] for r in scores}
                assert max(ifd_of[p] for p in picks) < 1
    shares = [s["methods"]["random"][0]["noise_share"] for s in data["per_seed"]]
    assert data["summary"]["methods"]["random"][0]["noise_share"]["mean"] == pytest.approx(np.mean(shares))
    lines = [
        line for line in stdout.splitlines() if line.startswith(("iterit:", "ifd:", "random:", "longest:"))
    ]
    assert len(lines) == 4 and "noise" in lines[0]


def test_audit_again_redoes_nothing_and_reuses_the_scores(audited, cli_module):
    out, config, _ = audited
    noise = out / "seed_1" / "noise" / "samples.parquet"
    before = (
        noise.stat().st_mtime_ns,
        (out / "seed_1" / "select" / "ifd" / "order.parquet").stat().st_mtime_ns,
    )
    code, stdout = cli_module(
        ["audit", config, "--seeds", "1,2", "--methods", "iterit,ifd,random,longest", "--output", out,
         "--noise", "mismatch=0.1,duplicate=0.1,near_duplicate=0.1,truncated=0.1,same_response=0.2"]
    )  # fmt: skip
    assert code == 0, stdout[-2000:]
    after = (
        noise.stat().st_mtime_ns,
        (out / "seed_1" / "select" / "ifd" / "order.parquet").stat().st_mtime_ns,
    )
    assert before == after and "scoring the injected rows" not in stdout and "selects" not in stdout


def test_audit_with_a_run_scores_only_the_injected_rows(audited, cli_module, tmp_path):
    out, config, _ = audited
    clean = out / "clean"  # a run directory with ingest and iteration 0 scored
    code, stdout = cli_module(
        ["audit", config, "--run", clean, "--seeds", "5", "--methods", "ifd", "--output", tmp_path / "o",
         "--noise", "mismatch=0.2"]
    )  # fmt: skip
    assert code == 0, stdout[-2000:]
    assert not (tmp_path / "o" / "clean").exists()
    summary = json.loads((tmp_path / "o" / "seed_5" / "noise" / "score_summary.json").read_text())
    assert summary["rows"] == 12
    data = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert data["clean_run"] == str(clean) and list(data["summary"]["kinds"]) == [CLEAN, "mismatch"]


def test_audit_iterations_train_and_rescore(audited, cli_module, tmp_path):
    out, config, _ = audited
    code, stdout = cli_module(
        ["audit", config, "--run", out / "clean", "--seeds", "1", "--methods", "ifd", "--iterations", "2",
         "--output", tmp_path / "o", "--noise", "mismatch=0.2"]
    )  # fmt: skip
    assert code == 0, stdout[-3000:]
    run = RunDir(str(tmp_path / "o" / "seed_1" / "ifd"))
    assert (tmp_path / "o" / "seed_1" / "ifd" / "model" / "iter_1").is_dir()
    data = json.loads((tmp_path / "o" / "audit.json").read_text())
    per = data["per_seed"][0]["methods"]["ifd"]
    assert len(per) == 2 and [p["picks"] for p in per] == [len(run.selection(e).read_picks()) for e in (0, 1)]
    first, second = (run.selection(e).read_picks() for e in (0, 1))
    assert per[1]["kept_from_iteration_0"] == pytest.approx(len(set(first) & set(second)) / len(second))
    assert per[0]["kept_from_iteration_0"] is None
    assert "iteration 1" in (tmp_path / "o" / "audit.md").read_text()


def test_audit_names_bad_options(cli, tiny_run_config, loop_corpus, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(loop_corpus, tmp_path / "run")))
    code, _, err = cli(["audit", config, "--methods", "full"])
    assert code == 2 and "--methods full" in err
    code, _, err = cli(["audit", config, "--noise", "mismatch=x"])
    assert code == 2 and "KIND=FRACTION" in err
    code, _, err = cli(["audit", config, "--iterations", "0", "--noise", "mismatch=0.1"])
    assert code == 2 and "--iterations 0" in err


def test_the_table_reads_a_kind_whose_rows_were_all_rejected_at_scoring():
    from iterit.audit import to_markdown

    kind = np.array([CLEAN] * 4 + ["truncated"] * 2, dtype=object)
    ifd = np.array([0.2, 0.4, 0.6, 0.8, np.nan, np.nan])  # both truncated rows rejected at scoring
    per_seed = [seed_figures(kind, ifd, {"ifd": [np.array([0, 1])]})]
    data = {"base_model": "m", "clean_samples": 4, "injected": 2, "k": 2, "ratio": 0.5, "seeds": [1]}
    data |= {"iterations": 1, "per_seed": per_seed, "summary": across_seeds(per_seed)}
    row = next(line for line in to_markdown(data).splitlines() if line.startswith("| truncated |"))
    assert row.endswith("| 2 | 0 | 0.0 (-) | - |")


def test_audit_stopped_halfway_redoes_the_unfinished_and_keeps_every_id_once(audited, cli_module):
    """What a kill leaves: a pool without its manifest (copied halfway) and a selection without its
    order. The rerun rebuilds both; the figures are those of the uninterrupted audit."""
    out, config, _ = audited
    before = json.loads((out / "audit.json").read_text())
    pool = out / "seed_2" / "pool"
    (pool / "manifest.json").unlink()
    next((pool / "iter_0" / "scores" / "noise").rglob("*.parquet")).unlink()
    (out / "seed_2" / "select" / "iterit" / "order.parquet").unlink()
    code, stdout = cli_module(
        ["audit", config, "--seeds", "1,2", "--methods", "iterit,ifd,random,longest", "--output", out,
         "--noise", "mismatch=0.1,duplicate=0.1,near_duplicate=0.1,truncated=0.1,same_response=0.2"]
    )  # fmt: skip
    assert code == 0, stdout[-2000:]
    assert "seed 2: iterit selects" in stdout and "seed 1: iterit selects" not in stdout
    ids = read_scores(RunDir(str(pool)).scoring(0).written, ["id"]).column("id").to_pylist()
    parts = [str(out / "clean" / "iter_0" / "scores"), str(out / "seed_2" / "noise" / "scores")]
    scored = [i for part in parts for i in read_scores(part, ["id"]).column("id").to_pylist()]
    assert sorted(ids) == sorted(scored) and len(ids) == len(set(ids))  # every scored id, once
    assert json.loads((out / "audit.json").read_text())["per_seed"] == before["per_seed"]
