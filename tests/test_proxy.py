"""Proxy scoring (docs/scoring.md#proxy): a small model of another family scores every sample in
iteration 0, the base model re-scores the proxy's best W and selects from them; a driver killed in the
proxy pass and again in the window's re-scoring resumes to the picks of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import proxy_tree
from test_loop import _driver, _kill_when_running, _selections

from iterit.rundir import iter_scores, read_scores


def _all_ids(scores: Path) -> list[str]:
    """Every id of a scores folder, rejects included, as often as the parts hold it."""
    return [
        i for t in iter_scores(str(scores), ["id"], scored_only=False) for i in t.column("id").to_pylist()
    ]


def test_config_of_the_proxy(tiny_run_config, loop_corpus, tmp_path):
    from iterit.config import config_from_dict
    from iterit.errors import IteritError

    tree = proxy_tree(tiny_run_config, loop_corpus, tmp_path, "some/proxy")
    tree["scoring"]["proxy_chat_template"] = "chatml"
    cfg = config_from_dict(tree)
    proxy = cfg.proxy()
    assert (proxy.base_model, proxy.chat_template, proxy.sequence_len) == ("some/proxy", "chatml", 64)
    assert cfg.base_model != proxy.base_model and cfg.scoring == proxy.scoring
    assert cfg.proxy_window(60) == 12  # k x update_ratio = 6 x 2, as later iterations
    tree["scoring"]["proxy_window"] = 20
    assert config_from_dict(tree).proxy_window(60) == 20 and config_from_dict(tree).proxy_window(15) == 15
    with pytest.raises(IteritError, match="full .* saves nothing"):
        config_from_dict({**tree, "iterations": 1, "selection": {"method": "full"}})
    with pytest.raises(ValueError, match="no scoring.proxy_model"):
        config_from_dict(tiny_run_config(loop_corpus, tmp_path)).proxy()


def test_a_row_must_fit_the_base_models_template_too(tiny_model_dir, tiny_proxy_dir):
    """The proxy's pass templates every row under the base model too (no forward pass): a row the base
    model's template cannot fit is rejected, and the detail names the model that refused it."""
    from iterit.config import config_from_dict
    from iterit.scoring.actor import template_rows

    long_prompt = " ".join(["explain the number"] * 12)
    batch = pa.table(
        {
            "id": ["short", "long"],
            "source": ["c.jsonl"] * 2,
            "row": [0, 1],
            "messages": [
                [{"role": "user", "content": "why"}, {"role": "assistant", "content": "because it is"}],
                [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "yes"}],
            ],
        }
    )
    base = {"base_model": tiny_model_dir, "datasets": [{"path": "unused"}], "sequence_len": 16}
    proxy = config_from_dict({**base, "base_model": tiny_proxy_dir, "sequence_len": 256})
    alone = template_rows(batch, cfg=proxy).column("reject").to_pylist()
    assert alone == ["", ""]  # the proxy's own limit fits both
    out = template_rows(batch, cfg=proxy, fit_under=config_from_dict(base)).to_pydict()
    assert out["reject"] == ["", "response_truncated"]
    assert out["detail"][1].startswith(f"under the base model {tiny_model_dir}'s template: ")
    assert len(out["cond_ids"][0]) > 0 and out["cond_ids"][1] == []
    tight = config_from_dict({**base, "base_model": tiny_proxy_dir})
    out = template_rows(batch, cfg=tight, fit_under=config_from_dict(base)).to_pydict()
    assert out["detail"][1].startswith(f"under the proxy {tiny_proxy_dir}'s template: ")


def test_a_run_with_a_proxy_rescores_only_the_proxys_window(proxy_uninterrupted, loop_corpus):
    from iterit.loop import proxy_order
    from iterit.rundir import RunDir

    run_dir, out = proxy_uninterrupted
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"])[:5] == [
        "ingest",
        "iter_0/proxy_score",
        "iter_0/proxy_select",
        "iter_0/score",
        "iter_0/select",
    ]
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    accepted = [json.loads(line)["id"] for line in open(loop_corpus)][:60]
    proxy_ids = _all_ids(run_dir / "iter_0" / "proxy" / "scores")
    assert sorted(proxy_ids) == sorted(accepted)  # the proxy scores all N, each once
    order = proxy_order(RunDir(str(run_dir))).to_pylist()
    status = dict(
        zip(
            *pq.read_table(run_dir / "iter_0" / "proxy" / "order.parquet", columns=["id", "status"])
            .to_pydict()
            .values()
        )
    )
    # the window is the proxy's first 12 candidates (its picks first); its others only where it has
    # fewer candidates than that (a random tiny model finds many IFDs >= 1)
    window = order[:12]
    candidates = sum(s != "other" for s in status.values())
    assert 6 <= candidates < 60
    assert [status[i] for i in window[:6]] == ["selected"] * 6
    assert [status[i] == "other" for i in window] == [j >= candidates for j in range(12)]
    base_ids = _all_ids(run_dir / "iter_0" / "scores")
    assert sorted(base_ids) == sorted(window)  # the base model re-scored the window, each id once
    # iteration 0's order: the window re-ordered, then the proxy's order as it was
    order0 = pq.read_table(run_dir / "iter_0" / "order.parquet").to_pydict()
    assert sorted(order0["id"][:12]) == sorted(window) and order0["id"][12:] == order[12:]
    assert order0["status"][12:] == ["tail"] * 48
    # the picks were made on the base model's IFD, not the proxy's
    base = dict(zip(*read_scores(str(run_dir / "iter_0" / "scores"), ["id", "ifd"]).to_pydict().values()))
    prox = dict(
        zip(*read_scores(str(run_dir / "iter_0" / "proxy" / "scores"), ["id", "ifd"]).to_pydict().values())
    )
    picks = [json.loads(line) for line in open(run_dir / "iter_0" / "selection.jsonl")]
    assert len(picks) == 6 and {p["id"] for p in picks} <= set(window)
    assert np.allclose([p["ifd"] for p in picks], [base[p["id"]] for p in picks])
    assert not np.allclose([p["ifd"] for p in picks], [prox.get(p["id"], np.nan) for p in picks])
    # iteration 1 is as without a proxy: the first W of iteration 0's order, re-scored by its model
    assert sorted(_all_ids(run_dir / "iter_1" / "scores")) == sorted(order0["id"][:12])
    summary = json.loads((run_dir / "iter_0" / "proxy" / "score_summary.json").read_text())
    assert summary["rows"] == 60 and summary["scored"] + summary["rejected"] == 60


def test_a_driver_killed_in_the_proxy_pass_and_in_the_window_resumes_exactly(
    proxy_uninterrupted, ray_local, tiny_run_config, loop_corpus, tiny_proxy_dir, tmp_path
):
    from iterit.loop import run

    address = ray_local.get_runtime_context().gcs_address
    run_dir = tmp_path / "run"
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(proxy_tree(tiny_run_config, loop_corpus, run_dir, tiny_proxy_dir)))
    manifest = run_dir / "manifest.json"

    _kill_when_running(_driver(["run", str(cfg_path)], address), manifest, "iter_0/proxy_score", delay=1.5)
    assert json.loads(manifest.read_text())["stages"]["iter_0/proxy_score"]["status"] == "running"
    _kill_when_running(
        _driver(["run", "--resume", str(run_dir)], address), manifest, "iter_0/score", delay=1.5
    )
    stages = json.loads(manifest.read_text())["stages"]
    assert stages["iter_0/proxy_select"]["status"] == "done" and stages["iter_0/score"]["status"] == "running"

    run(resume=str(run_dir), log=lambda *_: None)
    stages = json.loads(manifest.read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values())
    assert _selections(run_dir) == _selections(proxy_uninterrupted[0])
    for folder in ("iter_0/proxy", "iter_0", "iter_1"):
        ids = _all_ids(run_dir / folder / "scores")
        assert len(ids) == len(set(ids)) == len(_all_ids(proxy_uninterrupted[0] / folder / "scores"))
        assert not (run_dir / folder / "scores.checkpoint").exists()


def test_the_report_of_a_proxy_run_shows_the_two_models_agreement(proxy_uninterrupted):
    from scipy.stats import spearmanr

    from iterit.report import load_run, proxy_agreement

    run_dir, out = proxy_uninterrupted
    page = Path(out["report"]).read_text()
    assert (run_dir / "report" / "proxy.png").stat().st_size > 0
    # the Spearman on the page is that of the two IFDs over the window, recomputed from the files
    base = read_scores(str(run_dir / "iter_0" / "scores"), ["id", "ifd"]).to_pydict()
    prox = dict(
        zip(*read_scores(str(run_dir / "iter_0" / "proxy" / "scores"), ["id", "ifd"]).to_pydict().values())
    )
    both = [(prox[i], b) for i, b in zip(base["id"], base["ifd"]) if i in prox]
    rho = spearmanr(*zip(*both)).statistic
    proxy_ifd, base_ifd, got = proxy_agreement(load_run(str(run_dir)))
    assert len(base_ifd) == len(both) and got == pytest.approx(rho)
    assert f"Spearman of the two IFDs on the window: {rho:.3f} over {len(both):,} samples" in page
    assert "iter 0 proxy scoring" in page and "| iter_0/proxy_score | done |" in page
    assert "What is missing\n\nNothing" in page


def test_a_report_without_a_proxy_has_no_proxy_plot(uninterrupted):
    run_dir, out = uninterrupted
    assert not (run_dir / "report" / "proxy.png").exists()
    assert "proxy" not in Path(out["report"]).read_text().lower()


def test_compare_runs_the_proxy_path(
    proxy_uninterrupted, ray_local, tiny_run_config, loop_corpus, tiny_proxy_dir, tmp_path
):
    """`iterit compare --methods iterit+proxy`: the proxy's pass is a shared stage, like iteration 0's
    scoring; the run re-scores its own window and picks what a plain `iterit run` with the proxy picks.
    (One method only: each one more costs a fit and an evaluation; test_compare covers the plain ones.)"""
    from conftest import iterit_main

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(line for line in open(loop_corpus).readlines()[:10]))
    cfg_path = tmp_path / "config.yaml"
    tree = proxy_tree(tiny_run_config, loop_corpus, tmp_path / "runs", tiny_proxy_dir, iterations=1)
    cfg_path.write_text(yaml.safe_dump(tree))
    out = tmp_path / "cmp"
    argv = ["compare", str(cfg_path), "--methods", "iterit+proxy", "--heldout", str(heldout)]
    assert iterit_main([*argv, "--output", str(out)]) == 0
    shared = json.loads((out / "shared" / "manifest.json").read_text())["stages"]
    assert list(shared) == ["ingest", "iter_0/score", "iter_0/proxy_score"]
    proxied = out / "seed_7" / "iterit+proxy"
    parts = sorted((out / "shared" / "iter_0" / "proxy" / "scores").glob("*.parquet"))
    assert parts and [p.read_bytes() for p in parts] == [
        p.read_bytes() for p in sorted((proxied / "iter_0" / "proxy" / "scores").glob("*.parquet"))
    ]
    stages = json.loads((proxied / "manifest.json").read_text())["stages"]
    assert stages["iter_0/proxy_score"]["shared_from"] == str(out / "shared")
    assert "shared_from" not in stages["iter_0/proxy_select"] and "shared_from" not in stages["iter_0/score"]
    assert len(_all_ids(proxied / "iter_0" / "scores")) == 12  # its own window, not the shared full pass
    picks = [json.loads(line)["id"] for line in open(proxied / "iter_0" / "selection.jsonl")]
    ref = proxy_uninterrupted[0] / "iter_0" / "selection.jsonl"
    assert picks == [json.loads(line)["id"] for line in open(ref)]
    assert "| iterit+proxy |" in (out / "compare.md").read_text()


def test_a_compares_plain_method_is_the_full_path(tiny_run_config, loop_corpus, tmp_path):
    from iterit.compare import run_config
    from iterit.config import config_from_dict

    cfg = config_from_dict(proxy_tree(tiny_run_config, loop_corpus, tmp_path, "p"))
    plain, proxied = run_config(cfg, str(tmp_path), 7, "ifd"), run_config(cfg, str(tmp_path), 7, "ifd+proxy")
    assert plain.scoring.proxy_model is None and proxied.scoring.proxy_model == "p"
    assert plain.selection.method == proxied.selection.method == "ifd"
    assert proxied.output_dir.endswith("seed_7/ifd+proxy")


def test_proxy_variants_need_a_proxy_and_the_audit_takes_them(tiny_run_config, loop_corpus, tmp_path):
    from iterit.audit import parse_audit_methods
    from iterit.compare import parse_methods, split_method
    from iterit.config import config_from_dict
    from iterit.errors import IteritError

    plain = config_from_dict(tiny_run_config(loop_corpus, tmp_path))
    with_proxy = config_from_dict(proxy_tree(tiny_run_config, loop_corpus, tmp_path, "p"))
    assert split_method("ifd+proxy") == ("ifd", True) and split_method("ifd") == ("ifd", False)
    assert parse_methods("iterit,ifd+proxy", with_proxy) == ["iterit", "ifd+proxy"]
    with pytest.raises(IteritError, match="needs a proxy model: set scoring.proxy_model"):
        parse_methods("iterit+proxy", plain)
    with pytest.raises(IteritError, match="unknown method 'iterit\\+proxy\\+proxy'"):
        parse_methods("iterit+proxy+proxy", with_proxy)
    with pytest.raises(IteritError, match="full trains on every sample"):
        parse_methods("full+proxy", with_proxy)
    assert parse_audit_methods("iterit,iterit+proxy", with_proxy) == ["iterit", "iterit+proxy"]
    with pytest.raises(IteritError, match="needs a proxy model"):
        parse_audit_methods("iterit+proxy", plain)


AUDIT_NOISE = ["--noise", "mismatch=0.1,duplicate=0.1,truncated=0.1"]


@pytest.fixture(scope="module")
def proxy_audited(ray_local, tiny_run_config, loop_corpus, tiny_proxy_dir, tmp_path_factory):
    """`iterit audit --methods iterit,iterit+proxy` on the 60-row corpus, one seed."""
    from conftest import iterit_main

    tmp = tmp_path_factory.mktemp("proxy_audit")
    config = tmp / "audit.yaml"
    config.write_text(yaml.safe_dump(proxy_tree(tiny_run_config, loop_corpus, tmp / "run", tiny_proxy_dir)))
    argv = ["audit", str(config), "--seeds", "3", "--methods", "iterit,iterit+proxy", *AUDIT_NOISE]
    argv += ["--output", str(tmp / "out")]
    assert iterit_main(argv) == 0
    return tmp / "out", config, argv


def test_the_audits_proxy_variant_picks_what_the_loop_picks_on_the_pool(proxy_audited, tmp_path):
    """The audit's `iterit+proxy` takes the window's base-model scores from the pool (scored once);
    the loop's stages, the window re-scored by the base model for real, pick the same."""
    from iterit.compare import run_config, seed_run
    from iterit.config import config_from_dict
    from iterit.loop import proxy_order, score_stage, select_stage
    from iterit.rundir import Manifest, RunDir
    from iterit.templates import load_tokenizer

    out, config, _ = proxy_audited
    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    pool = RunDir(str(out / "seed_3" / "pool"))
    pool_manifest = Manifest.load(pool).data
    assert list(pool_manifest["stages"]) == ["ingest", "iter_0/score", "iter_0/proxy_score"]
    pool_ids = sorted(_all_ids(Path(pool.scoring(0).scores)))
    assert sorted(_all_ids(Path(pool.proxy_scoring().scores))) == pool_ids  # each row once by each model
    assert len(pool_ids) == 60 + 18
    # the clean corpus is scored by the base model in full (the full path), the proxy's pass beside it
    assert len(_all_ids(out / "clean" / "iter_0" / "scores")) == 60
    assert len(_all_ids(out / "clean_proxy" / "scores")) == 60

    audit_run = RunDir(str(out / "seed_3" / "select" / "iterit+proxy"))
    window = set(_all_ids(Path(audit_run.scoring(0).scores)))
    picks = audit_run.selection(0).read_picks()
    w = cfg.proxy_window(78)
    assert window == set(proxy_order(audit_run).slice(0, w).to_pylist()) and set(picks) <= window

    rc = run_config(cfg.model_copy(update={"iterations": 1}), str(tmp_path), 3, "iterit+proxy")
    ref = RunDir(rc.output_dir)
    seed_run(rc, pool.path, pool_manifest)
    samples = pool_manifest["stages"]["ingest"]["result"]["samples"]
    eos = load_tokenizer(cfg.base_model, cfg.chat_template).eos_token
    select_stage(rc, ref, 0, samples, eos, proxy=True)
    score_stage(rc, ref, 0, samples, log=lambda *_: None)  # the base model's own pass over the window
    select_stage(rc, ref, 0, samples, eos)
    assert ref.selection(0).read_picks() == picks

    data = json.loads((out / "audit.json").read_text())
    assert data["proxy_model"] == cfg.scoring.proxy_model and data["proxy_window"] == w
    assert data["per_seed"][0]["methods"]["iterit+proxy"][0]["picks"] == len(picks)
    md = (out / "audit.md").read_text()
    assert "| iterit+proxy |" in md and f"first W = {w:,} candidates" in md


def test_the_proxy_audit_again_redoes_nothing(proxy_audited):
    import contextlib
    import io

    from conftest import iterit_main

    out, _, argv = proxy_audited
    order = out / "seed_3" / "select" / "iterit+proxy" / "iter_0" / "order.parquet"
    before = order.stat().st_mtime_ns
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert iterit_main(argv) == 0
    assert order.stat().st_mtime_ns == before
    assert "the proxy scores" not in buf.getvalue() and "selects" not in buf.getvalue()


def test_an_audit_refuses_a_run_scored_through_a_proxy(proxy_uninterrupted, proxy_audited, cli):
    out, config, _ = proxy_audited
    code, _, err = cli(["audit", config, "--run", proxy_uninterrupted[0], *AUDIT_NOISE])
    assert code == 2 and "its iteration 0 scores are the proxy's window only" in err
