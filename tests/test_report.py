"""Report: a synthetic run directory written to the run-directory contract, reported whole and in part."""

import json
import math
import sys

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from iterit.errors import IteritError
from iterit.report import overlap_matrix, write_report

N, K, W = 200, 10, 30
INGEST_REJECTS = {"invalid_json": 6, "missing_field": 4}
SCORE_REJECTS = {"response_truncated": 3}
FINAL_LOSS = 0.8123
STEPS = 5  # optimizer steps per iteration


def _stage(result, seconds=2.0, status="done"):
    st = {
        "status": status,
        "started": "2026-11-25T13:00:00Z",
        "finished": "2026-11-25T13:00:02Z",
        "seconds": seconds,
    }
    return {**st, "result": result} if status == "done" else {"status": status, "started": st["started"]}


def _write_order(path, ids, ifd_of, statuses):
    pq.write_table(
        pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "position": np.arange(len(ids), dtype=np.int64),
                "ifd": pa.array([ifd_of.get(i, math.nan) for i in ids], pa.float64()),
                "status": pa.array(statuses, pa.string()),
            }
        ),
        path,
    )


def _iteration(run, e, window, rng, keep_from_prev, prev_selected, tail, unscored=()):
    """Score `window` (ids), select K of them keeping `keep_from_prev` of the previous picks, write files.

    `unscored`: ids rejected at scoring; like the selection stage, the order keeps them among the others."""
    d = run / f"iter_{e}"
    d.mkdir()
    ifd = dict(zip(window, rng.lognormal(-0.3, 0.35, len(window))))
    emb = rng.normal(size=(len(window), 4)).astype(np.float32)
    pq.write_table(
        pa.table(
            {
                "id": pa.array(window, pa.string()),
                "ifd": pa.array([ifd[i] for i in window], pa.float64()),
                "loss_cond": pa.array(rng.uniform(1, 2, len(window))),
                "loss_prior": pa.array(rng.uniform(1, 2, len(window))),
                "n_prompt_tokens": pa.array(rng.integers(5, 50, len(window)), pa.int32()),
                "n_response_tokens": pa.array(rng.integers(5, 50, len(window)), pa.int32()),
                "embedding": pa.array(list(emb), pa.list_(pa.float32())),
            }
        ),
        d / "scores.parquet",
    )
    fresh = [i for i in window if i not in prev_selected]
    selected = list(prev_selected[:keep_from_prev]) + fresh[: K - keep_from_prev]
    with open(d / "selection.jsonl", "w") as f:
        for rank, i in enumerate(selected):
            f.write(json.dumps({"id": i, "rank": rank, "ifd": ifd[i], "gain": ifd[i] * 2}) + "\n")
    rest = [i for i in window if i not in selected]
    cands = [i for i in rest if ifd[i] < 1]
    others = [i for i in rest if ifd[i] >= 1] + list(unscored)
    _write_order(
        d / "order.parquet",
        selected + others + cands + tail,
        ifd,
        ["selected"] * K + ["other"] * len(others) + ["candidate"] * len(cands) + ["tail"] * len(tail),
    )
    summary = {
        "rows": len(window),
        "scored": len(window),
        "rejected": 0,
        "rejected_by_reason": {},
        "tokens": 1234,
        "padding_fraction": 0.05,
        "seconds": 3.0,
        "samples_per_s": 66.0,
        "tokens_per_s": 411.0,
    }
    (d / "score_summary.json").write_text(json.dumps(summary))
    with open(d / "train_metrics.jsonl", "w") as f:
        for s in range(STEPS):
            step = e * STEPS + s
            loss = FINAL_LOSS if (e, s) == (2, STEPS - 1) else 1.5 - 0.04 * step
            f.write(
                json.dumps(
                    {
                        "iteration": e,
                        "step": step,
                        "lr": 2e-5 * math.cos(step / 30),
                        "loss": loss,
                        "tokens": 500,
                        "seconds": 0.5,
                    }
                )
                + "\n"
            )
    return selected, selected + others + cands + tail, summary, len(cands) + K


def make_run(tmp_path, iterations=3):
    """A finished 3-iteration run: overlap of S1 with S0 is 4/10, of S2 with S1 7/10 (constructed)."""
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    (run / "ingest").mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "base_model": "tiny-llama",
                "seed": 42,
                "iterations": iterations,
                "sequence_len": 512,
                "learning_rate": 2e-5,
                "selection": {"method": "iterit", "ratio": 0.05, "update_ratio": 3, "decay": 0.1},
            }
        )
    )
    ingest = {
        "read": N + 10,
        "accepted": N,
        "rejected": 10,
        "rejected_by_reason": INGEST_REJECTS,
        "files": [
            {"source": "a.jsonl", "read": N + 10, "accepted": N, "rejected": 10, "by_reason": INGEST_REJECTS}
        ],
    }
    (run / "ingest" / "summary.json").write_text(json.dumps(ingest))
    stages = {"ingest": _stage(ingest, 1.2)}
    ids = [f"a:{i}" for i in range(N)]
    selected, order, summary, cands = _iteration(run, 0, ids[3:], rng, 0, [], [], unscored=ids[:3])
    summary.update(rows=N, rejected=3, rejected_by_reason=SCORE_REJECTS)
    (run / "iter_0" / "score_summary.json").write_text(json.dumps(summary))
    keep = [None, 4, 7]
    for e in range(iterations):
        if e:
            prev = selected
            window, tail = order[:W], order[W:]
            selected, order, summary, cands = _iteration(run, e, window, rng, keep[e], prev, tail)
        stages[f"iter_{e}/score"] = _stage(summary, 3.0)
        stages[f"iter_{e}/select"] = _stage(
            {"samples": N, "k": K, "candidates": cands, "method": "iterit"}, 0.4
        )
        stages[f"iter_{e}/train"] = _stage(
            {
                "steps": STEPS,
                "tokens": 2500,
                "seconds": 2.5,
                "tokens_per_s": 1000.0,
                "final_loss": FINAL_LOSS if e == 2 else 1.0,
                "model": f"model/iter_{e}",
            },
            2.5,
        )
    manifest = {
        "format": 1,
        "run_dir": str(run),
        "seed": 42,
        "created": "2026-11-25T13:00:00Z",
        "iterations": iterations,
        "versions": {"iterit": "0.1.0", "python": "3.11"},
        "stages": stages,
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run, manifest


def _table_row(md, first_cell):
    return next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))


def test_overlap_matrix_by_hand():
    m = overlap_matrix([["a", "b", "c", "d"], ["c", "d", "e", "f"], ["a", "b", "c", "d"]])
    np.testing.assert_allclose(m, [[1, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 1]])


def test_full_run_report(tmp_path):
    run, manifest = make_run(tmp_path)
    out = write_report(str(run))
    md = open(out["report"]).read()
    page = open(out["html"]).read()
    assert out["report"].endswith("report/report.md") and out["html"].endswith("report/report.html")
    # Planted numbers: rejects per reason and where they happened, k, window, final loss, overlaps.
    assert _table_row(md, "invalid_json").split("|")[2].strip() == "6"
    assert _table_row(md, "response_truncated").split("|")[3].strip() == "3"
    assert "210 read, 200 accepted, 10 rejected" in md
    assert "| k per iteration | 10, 10, 10 (ratio 0.05) |" in md
    assert "| window W, re-scored after iteration 0 | 30, 30 (k x update_ratio 3) |" in md
    assert "final loss 0.8123" in md
    assert "| iterations done / planned | 3 / 3 |" in md
    it1, it2 = _table_row(md, "1").split("|"), _table_row(md, "2").split("|")
    assert it1[7].strip() == "0.40" and it1[8].strip() == "6 / 6"
    assert it2[7].strip() == "0.70" and it2[8].strip() == "3 / 3"
    assert _table_row(md, "0").split("|")[2].strip() == "197"  # scored in iteration 0: N minus 3 rejects
    # Mean IFD of the selected vs the rest of the re-scored window, recomputed from the files by hand.
    scores = pq.read_table(run / "iter_1" / "scores.parquet", columns=["id", "ifd"]).to_pydict()
    chosen = {json.loads(line)["id"] for line in open(run / "iter_1" / "selection.jsonl")}
    ifd = dict(zip(scores["id"], scores["ifd"]))
    assert it1[5].strip() == f"{np.mean([ifd[i] for i in chosen]):.3f}"
    assert it1[6].strip() == f"{np.mean([v for i, v in ifd.items() if i not in chosen]):.3f}"
    # Iteration 2's steps 10..14: losses 1.1, 1.06, 1.02, 0.98 and the final 0.8123.
    assert it2[9].strip() == "5" and it2[10].strip() == f"{(1.1 + 1.06 + 1.02 + 0.98 + FINAL_LOSS) / 5:.4f}"
    assert "Nothing: all 3 planned iterations ran every stage." in md
    assert "could not draw" not in md
    # The HTML page says the same things.
    assert "210 read, 200 accepted, 10 rejected" in page and "<td>0.40</td>" in page


def test_full_run_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run, _ = make_run(tmp_path)
    out = write_report(str(run))
    md, page = open(out["report"]).read(), open(out["html"]).read()
    assert "Not drawn" not in md
    names = sorted(p.rsplit("/", 1)[-1] for p in out["plots"])
    assert names == sorted(
        [
            "rows.png",
            "ifd.png",
            "selected_vs_rest.png",
            "overlap.png",
            "rescoring.png",
            "training.png",
            "timings.png",
        ]
    )
    for p in out["plots"]:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, p
        name = p.rsplit("/", 1)[-1]
        assert f"]({name})" in md and f'src="{name}"' in page


def test_the_report_stage_being_written_is_not_listed_as_running(tmp_path):
    """write_report runs inside the manifest's "report" stage, recorded as running until it returns: the
    page says so in its own words, and a finished run's page stays "complete"."""
    run, manifest = make_run(tmp_path)
    manifest["stages"]["report"] = {"status": "running", "started": "2026-11-25T13:05:00Z"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    md = open(write_report(str(run))["report"]).read()
    assert _table_row(md, "report").split("|")[2].strip() == "done (this page)"
    assert "complete." in md and "running" not in _table_row(md, "report")


def test_partial_run_reports_what_is_missing(tmp_path):
    run, manifest = make_run(tmp_path, iterations=3)
    # Only ingest and iteration 0's scoring finished; training "runs" without any step logged yet.
    for name in [s for s in manifest["stages"] if s not in ("ingest", "iter_0/score")]:
        del manifest["stages"][name]
    manifest["stages"]["iter_0/train"] = _stage(None, status="running")
    (run / "manifest.json").write_text(json.dumps(manifest))
    for e in (1, 2):
        for f in (run / f"iter_{e}").iterdir():
            f.unlink()
        (run / f"iter_{e}").rmdir()
    for f in ("selection.jsonl", "order.parquet"):
        (run / "iter_0" / f).unlink()
    (run / "iter_0" / "train_metrics.jsonl").write_text(
        '{"iteration": 0, "step": 0, "lr": 1e-6, "loss": 1.4}\n{"iter'
    )
    out = write_report(str(run))
    md = open(out["report"]).read()
    assert "incomplete" in md
    assert "- iter_0/select: not started" in md
    assert "- iter_0/train: running since 2026-11-25T13:00:00Z" in md
    assert "- iter_2/train: not started" in md
    assert "| iterations done / planned | 0 / 3 |" in md
    if "matplotlib is not installed" not in md:
        names = {p.rsplit("/", 1)[-1] for p in out["plots"]}
        assert names == {"rows.png", "ifd.png", "training.png", "timings.png"}
        assert "Overlap between selections: needs the selections of two iterations" in md


def test_failed_stage_is_reported_with_its_error(tmp_path):
    run, manifest = make_run(tmp_path, iterations=3)
    manifest["stages"]["iter_2/train"] = {
        "status": "failed",
        "started": "2026-11-25T13:05:00Z",
        "error": "CUDA out of memory | rank 0",
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    md = open(write_report(str(run))["report"]).read()
    assert "- iter_2/train: failed: CUDA out of memory | rank 0" in md
    assert "| iterations done / planned | 2 / 3 |" in md
    assert "could not draw" not in md


def test_plots_are_skipped_with_a_clear_line_without_matplotlib(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = write_report(str(run))
    assert out["plots"] == []
    assert "matplotlib is not installed (pip install matplotlib)" in open(out["report"]).read()


def test_report_on_an_fsspec_uri(tmp_path):
    run, _ = make_run(tmp_path)
    fs = fsspec.filesystem("memory")
    fs.put(str(run), "/report-test-run", recursive=True)
    try:
        out = write_report("memory://report-test-run")
        with fs.open("/report-test-run/report/report.md", "r") as f:
            assert "| k per iteration | 10, 10, 10 (ratio 0.05) |" in f.read()
        assert out["report"] == "memory://report-test-run/report/report.md"
    finally:
        fs.rm("/report-test-run", recursive=True)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(IteritError, match="not an iterit run directory \\(no manifest.json\\)") as e:
        write_report(str(tmp_path))
    assert str(tmp_path) in str(e.value)
