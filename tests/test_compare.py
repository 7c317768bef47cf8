"""`iterit compare` on the tiny model: methods iterit and full, one seed, two iterations. The table,
numbers and plot agree with the run directories; iteration 0's scoring ran once and is shared; full
trains on every sample once; a second compare redoes nothing; bad input is one clear line."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import WORDS, iterit_main

from iterit.rundir import read_scores

METHODS = ["iterit", "full"]  # each method more costs two Ray Train fits and two evaluations
SEED = 7
QUIET = dict(log=lambda *_: None)


def _rows(rng, n, prefix):
    return [
        {
            "id": f"{prefix}{i}",
            "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_run_config) -> dict:
    d = tmp_path_factory.mktemp("compare")
    rng = random.Random(11)
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, 60, "q")))
    (d / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, 10, "h")))
    # k = 6 of 60 per iteration, window 12, 3 optimizer steps per iteration (the tiny run's config)
    (d / "config.yaml").write_text(yaml.safe_dump(tiny_run_config(d / "corpus.jsonl", d / "runs", seed=SEED)))
    return {
        "dir": d,
        "config": d / "config.yaml",
        "heldout": d / "heldout.jsonl",
        "out": d / "runs" / "compare",
    }


@pytest.fixture(scope="module")
def compared(ray_local, files) -> Path:
    """The whole compare through the command line, into the default OUTPUT_DIR/compare."""
    assert (
        iterit_main(
            [
                "compare",
                str(files["config"]),
                "--methods",
                ",".join(METHODS),
                "--heldout",
                str(files["heldout"]),
            ]
        )
        == 0
    )
    return files["out"]


def _run(out: Path, method: str) -> Path:
    return out / f"seed_{SEED}" / method


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_table_and_plot_appear(compared):
    md = (compared / "compare.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in md
    assert "| base model | 0 |" in md and "overridden: full trains on everything once" in md
    assert "## Held-out loss per iteration" in md and "after iter 1" in md
    assert (compared / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:  # ordinary run directories: the loop's own report is there
        assert (_run(compared, method) / "report" / "report.md").exists()


def test_numbers_agree_with_the_run_directories(compared):
    data = json.loads((compared / "compare.json").read_text())
    assert data["methods"] == METHODS and data["seeds"] == [SEED]
    base = json.loads((compared / "shared" / "eval" / "base.json").read_text())
    assert data["base"]["loss"] == base["loss"] and base["loss"]["n"] == 10
    for r in data["runs"]:
        run_dir = Path(r["run_dir"])
        iters = 1 if r["method"] == "full" else 2
        assert r["iterations"] == iters and run_dir == _run(compared, r["method"])
        for e in range(iters):
            assert r["samples_per_iteration"][e] == len(_lines(run_dir / f"iter_{e}" / "selection.jsonl"))
            assert (
                r["tokens_per_iteration"][e]
                == sum(m["tokens"] for m in _lines(run_dir / f"iter_{e}" / "train_metrics.jsonl"))
                > 0
            )
            ev = json.loads((run_dir / "eval" / f"iter_{e}.json").read_text())
            assert ev["model"] == str(run_dir / "model" / f"iter_{e}")
            assert r["loss"][e] == ev["loss"]["loss"] and r["ppl"][e] == ev["loss"]["ppl"]
        stages = _manifest(run_dir)["stages"]
        assert r["seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()), abs=0.05)
        s = data["summary"][r["method"]]
        assert s["final_loss"]["mean"] == r["loss"][-1] and s["final_loss"]["std"] is None  # one seed
        assert s["tokens"]["mean"] == r["tokens"] == sum(r["tokens_per_iteration"])
    assert data["summary"]["iterit"]["samples_per_iteration"] == [6, 6]
    # what was picked: the IFD the selection saw, the response lengths, the distinct samples trained
    for r in data["runs"]:
        run_dir = Path(r["run_dir"])
        sels = [_lines(run_dir / f"iter_{e}" / "selection.jsonl") for e in range(r["iterations"])]
        assert r["picks_mean_ifd"] == pytest.approx([statistics.fmean(x["ifd"] for x in sel) for sel in sels])
        assert r["distinct_samples"] == len({x["id"] for sel in sels for x in sel})
        scores = read_scores(str(run_dir / "iter_0" / "scores")).to_pydict()
        tokens = dict(zip(scores["id"], scores["n_response_tokens"]))
        assert r["picks_mean_response_tokens"] == pytest.approx(
            [statistics.fmean(tokens[x["id"]] for x in sel) for sel in sels]
        )
        assert "picks" not in r  # the ids stay in the run directories
    assert data["overlap"] == []  # full selects nothing: no pair of selecting methods here
    # trained models differ from the base and from each other
    losses = {r["method"]: r["loss"][-1] for r in data["runs"]}
    assert len({*losses.values(), data["base"]["loss"]["loss"]}) == 3


def test_iteration_0_is_scored_once_and_shared(compared):
    shared = _manifest(compared / "shared")["stages"]
    assert list(shared) == ["ingest", "iter_0/score"] and shared["iter_0/score"]["seconds"] > 0

    def parts(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}

    want = parts(compared / "shared" / "iter_0" / "scores")
    assert want
    for method in METHODS:
        run_dir = _run(compared, method)
        assert parts(run_dir / "iter_0" / "scores") == want
        stages = _manifest(run_dir)["stages"]
        for name in ("ingest", "iter_0/score"):  # recorded done, at no cost, pointing at the run's own copies
            assert stages[name]["shared_from"] == str(compared / "shared") and stages[name]["seconds"] == 0.0
            assert stages[name]["shared_seconds"] == shared[name]["seconds"]
        assert stages["ingest"]["result"]["samples"] == str(run_dir / "ingest" / "samples.parquet")
        assert stages["iter_0/score"]["result"]["scores"] == str(run_dir / "iter_0" / "scores")
        for name in ("iter_0/select", "iter_0/train"):  # and the rest ran in the run itself
            assert stages[name]["status"] == "done" and "shared_from" not in stages[name]
        assert stages["iter_0/train"]["seconds"] > 0
    # only iterations after the first re-score, with the run's own model
    assert _manifest(_run(compared, "iterit"))["stages"]["iter_1/score"]["result"]["rows"] == 12


def test_full_trains_on_every_sample_once(compared):
    run_dir = _run(compared, "full")
    stages = _manifest(run_dir)["stages"]
    assert [s for s in stages if s.startswith("iter_")] == ["iter_0/score", "iter_0/select", "iter_0/train"]
    scored = read_scores(str(run_dir / "iter_0" / "scores")).num_rows
    assert scored == 60 and len(_lines(run_dir / "iter_0" / "selection.jsonl")) == 60
    # the LR schedule is sized for the 60 samples trained (30 steps), not for k = 6
    train = stages["iter_0/train"]["result"]
    assert train["steps"] == train["total_steps"] == 30
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["iterations"] == 1


def test_a_second_compare_redoes_nothing(compared, files):
    from iterit.compare import compare
    from iterit.config import load_config

    def snapshot():
        dirs = [compared / "shared"] + [_run(compared, m) for m in METHODS]
        finished = {(str(d), k): v["finished"] for d in dirs for k, v in _manifest(d)["stages"].items()}
        evals = {str(p): p.stat().st_mtime_ns for p in compared.rglob("eval/*.json")}
        return finished, evals

    before = snapshot()
    assert len(before[1]) == 1 + 2 + 1  # base, iterit x 2, full
    data = compare(load_config(files["config"]), METHODS, [SEED], [str(files["heldout"])], **QUIET)
    assert snapshot() == before
    assert data == json.loads((compared / "compare.json").read_text())


def test_a_changed_config_is_refused_on_the_same_output(compared, files):
    from iterit.compare import compare
    from iterit.config import load_config
    from iterit.errors import IteritError

    with pytest.raises(IteritError, match="made with another config .*learning_rate"):
        compare(
            load_config(files["config"], ["learning_rate=0.01"]),
            METHODS,
            [SEED],
            [str(files["heldout"])],
            **QUIET,
        )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "iterit,bogus", "--heldout", "H"], "error: --methods: unknown method 'bogus'"),
        (["--methods", " , ", "--heldout", "H"], "error: --methods is empty"),
        (["--methods", "iterit"], "error: compare needs held-out data"),
        (
            ["--methods", "embedding", "--heldout", "H", "--set", "scoring.embeddings=false"],
            "error: --methods embedding",
        ),
        (["--methods", "iterit", "--heldout", "H", "--seeds", "4x"], "error: --seeds '4x'"),
        (["--methods", "iterit", "--heldout", "/nonexistent/h.jsonl"], "error: data path not found"),
    ],
)
def test_errors_are_one_clear_line(files, extra, message, cli):
    code, _, err = cli(["compare", files["config"], *[files["heldout"] if a == "H" else a for a in extra]])
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1, err


def test_the_table_shows_spread_and_gsm8k(compared):
    """Two seeds' worth of numbers and GSM8K results, rendered without running anything."""
    from iterit.compare import _stats, to_markdown

    assert _stats([1.0, 2.0, 4.0])["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    data = json.loads((compared / "compare.json").read_text())
    data["base"]["gsm8k"] = {"exact_match": 0.25, "n": 4}
    for s in data["summary"].values():
        s["final_loss"] = _stats([1.5, 1.7])
        s["seeds"] = [7, 8]
        s["gsm8k_per_iteration"] = [_stats([0.5, 0.25]) for _ in range(s["iterations"])]
    data["overlap"] = [{"methods": ["iterit", "ifd"], "jaccard_per_iteration": [_stats([1.0, 0.5])]}]
    md = to_markdown(data)
    assert "1.6000 ± 0.1414" in md and "7: 1.5000, 8: 1.7000" in md
    assert "## How much the selections agree" in md and "| iterit vs ifd | 0.75 ± 0.35 | - |" in md
    assert "## What each method picked" in md
    data["paired"] = {
        "reference": "iterit",
        "conversations": 25,
        "resamples": 2000,
        "methods": {"full": {"difference": -0.05, "low": -0.07, "high": -0.03, "fraction_lower": 1.0}},
    }
    md = to_markdown(data)
    assert "## Against iterit, paired over the held-out conversations" in md
    assert "| full | -0.0500 | [-0.0700, -0.0300] | 100% |" in md
    assert "## GSM8K exact match (4 questions)" in md and "| 0.250 | 0.375 ± 0.177 |" in md


def test_selection_overlap_is_the_jaccard_of_the_picks_per_iteration():
    from iterit.compare import selection_overlap

    runs = [
        {"method": "iterit", "seed": 1, "picks": [["a", "b"], ["a", "c"]]},
        {"method": "ifd", "seed": 1, "picks": [["a", "b"], ["d", "e"]]},
        {"method": "iterit", "seed": 2, "picks": [["a", "b"], ["b", "c"]]},
        {"method": "ifd", "seed": 2, "picks": [["b", "c"], ["b", "c"]]},
        {"method": "full", "seed": 1, "picks": [["a", "b", "c", "d", "e"]]},
        {"method": "full", "seed": 2, "picks": [["a", "b", "c", "d", "e"]]},
    ]
    (o,) = selection_overlap(runs, ["iterit", "ifd", "full"])
    assert o["methods"] == ["iterit", "ifd"]
    it0, it1 = o["jaccard_per_iteration"]
    assert it0["values"] == [1.0, pytest.approx(1 / 3)] and it1["values"] == [0.0, 1.0]
    assert it1["mean"] == 0.5 and it1["std"] == pytest.approx(statistics.stdev([0.0, 1.0]))


def test_paired_bootstrap_is_the_token_weighted_difference_over_resampled_conversations(tmp_path):
    import numpy as np
    import pyarrow as pa

    from iterit.compare import paired_bootstrap

    rng = np.random.default_rng(3)
    ids = [f"h{i}" for i in range(30)]
    tokens = rng.integers(5, 50, size=30)
    base = rng.uniform(1.0, 2.0, size=30)
    # b is a's loss minus 0.1 on every conversation: lower in every resample
    shift = {"a": 0.0, "b": -0.1, "c": 0.0}
    runs = []
    for m in ("a", "b", "c"):
        for seed in (1, 2):
            d = tmp_path / f"{m}{seed}" / "eval" / "iter_1"
            d.mkdir(parents=True)
            noise = rng.normal(0, 0.05, size=30) if m == "c" else np.zeros(30)
            pq.write_table(
                pa.table(
                    {
                        "id": ids,
                        "loss_cond": base + shift[m] + noise,
                        "n_response_tokens": pa.array(tokens, pa.int32()),
                    }
                ),
                d / "scores.parquet",
            )
            runs.append({"method": m, "seed": seed, "run_dir": str(tmp_path / f"{m}{seed}"), "iterations": 2})
    got = paired_bootstrap(runs, ["a", "b", "c"], n_boot=500)
    assert got["reference"] == "a" and got["conversations"] == 30 and got["resamples"] == 500
    b = got["methods"]["b"]
    assert (
        b["difference"] == pytest.approx(-0.1)
        and b["low"] == pytest.approx(-0.1)
        and b["high"] == pytest.approx(-0.1)
    )
    assert b["fraction_lower"] == 1.0
    c = got["methods"]["c"]  # seed-averaged noise: a small difference whose interval straddles 0
    cond = [
        pq.read_table(tmp_path / f"c{s}" / "eval" / "iter_1" / "scores.parquet")
        .column("loss_cond")
        .to_numpy()
        for s in (1, 2)
    ]
    want = float(np.sum(tokens * ((cond[0] + cond[1]) / 2 - base)) / np.sum(tokens))
    assert c["difference"] == pytest.approx(want) and c["low"] < want < c["high"] and c["low"] < 0 < c["high"]
    assert paired_bootstrap(runs, ["a", "b", "c"], n_boot=500) == got  # seeded: the same every time
    assert paired_bootstrap([{**r, "run_dir": str(tmp_path / "none")} for r in runs], ["a", "b"]) == {}
