"""`iterit plan`: the arithmetic against numbers worked by hand, the corpus measured or given, the table."""

import json

import pytest
import yaml

from iterit.plan import CorpusStats, format_plan, plan_rows


def test_stage_tokens_and_flops_are_the_hand_computed_ones():
    # P = 1,000, L = 2, d = 8: forward per token 2P + 2 L s d = 2,320 at s = 10, 2,128 at s = 4
    stats = CorpusStats(100, 10.0, 4.0, "given")
    rows = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8)
    assert [r.stage for r in rows] == [
        "iter 0 scoring (100 samples x 2 passes)",
        "iter 0 training (5 samples)",
        "iter 1 scoring (15 samples x 2 passes)",
        "iter 1 training (5 samples)",
    ]
    assert (rows[0].tokens, rows[0].flops) == (1400, 100 * (10 * 2320 + 4 * 2128))  # 3,171,200
    assert (rows[1].tokens, rows[1].flops) == (50, 3 * 50 * 2320)  # forward + backward: 3x
    assert (rows[2].tokens, rows[2].flops) == (210, 15 * (10 * 2320 + 4 * 2128))
    checkpointed = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8, gradient_checkpointing=True)
    assert checkpointed[1].flops == 4 * 50 * 2320  # one more forward
    evaluated = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8, eval_samples=7)
    assert evaluated[2].stage == "iter 0 evaluation (7 held out)" and len(evaluated) == 6
    assert (evaluated[2].tokens, evaluated[2].flops) == (70, 7 * 10 * 2320)
    # half the rows rejected by the template: iteration 0 scores 50; a later window of 15 holds the 5
    # picks, then the 50 rejects: only the picks are re-scored
    half = plan_rows(2, 100, 5, 15, CorpusStats(100, 10.0, 4.0, "given", 0.5), 1000, 2, 8)
    assert half[0].tokens == 50 * 14 and half[2].tokens == 5 * 14


def test_the_table_converts_flops_to_device_hours_and_wall_clock():
    stats = CorpusStats(10, 10.0, 5.0, "given")
    rows = plan_rows(1, 10, 1, 3, stats, 1e12, 0, 0)  # 10 x 15 tokens x 2e12 = 3e14 FLOPs; 3 x 10 x 2e12
    text = format_plan(rows, peak_flops=1e11, device="X", gpus=2, mfu=0.5, given=["given: N 10"])
    lines = text.splitlines()
    score, train, total = lines[2].split(), lines[3].split(), lines[4].split()
    assert score[-5:] == ["150", "3.00e+14", "1.67", "50", "min"]  # 3e14 / 5e10 = 6,000 s; 2 GPUs
    assert train[-4:-1] == ["6.00e+13", "0.333", "10"] and total[1:4] == ["160", "3.60e+14", "2"]
    assert "at 50% of 0.1 TFLOP/s (X) on 2 device(s); given: N 10" in lines[5]


def test_plan_measures_the_corpus_with_the_model_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer, cli):
    from iterit.config import DatasetConfig
    from iterit.data import normalise
    from iterit.templates import template_batch

    rows = [
        {"instruction": f"Question number {i:03d}?", "output": f"Answer {i:03d} is here."} for i in range(40)
    ]
    rows[7] = {"instruction": "no output field"}  # an ingest reject
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"base_model": tiny_model_dir, "datasets": [{"path": str(corpus)}], "sequence_len": 64,
           "iterations": 2, "selection": {"ratio": 4, "update_ratio": 2}}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = cli(["plan", str(path), "--gpus", "1", "--flops", "1e9", "--mfu", "1"])
    assert code == 0, err
    ds = DatasetConfig(path=str(corpus))
    convs = [normalise(r, ds) for i, r in enumerate(rows) if i != 7]
    done = template_batch(tiny_tokenizer, convs, 64)
    cond = sum(len(t.cond_ids) for t in done) / len(done)
    prior = sum(len(t.prior_ids) for t in done) / len(done)
    assert f"N counted: N 39, {cond:.0f} tokens a sample, {prior:.0f} a response" in out
    assert "iter 0 scoring (39 samples x 2 passes)" in out and "iter 1 scoring (8 samples x 2 passes)" in out
    assert out.count("iter 0 training (4 samples)") == 1 and "GiB/GPU" in out
    # more rows than are read: N extrapolated from the bytes (rows of one length: exact here)
    code, out, _ = cli(["plan", str(path), "--flops", "1e9", "--sample-rows", "10"])
    assert code == 0 and "N extrapolated: N 36," in out  # 40 rows x 9/10 accepted


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu", "tpu9"], "--gpu tpu9: expected one of h200, h100"),
        (["--samples", "10"], "--samples and --tokens-per-sample stand in for the corpus together"),
        (["--mfu", "1.5"], "--mfu 1.5: expected a share in (0, 1]"),
    ],
)
def test_plan_errors_name_the_flag(tmp_path, cli, args, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base_model": "m", "datasets": [{"path": "d.jsonl"}]}))
    code, _, err = cli(["plan", str(path), *args])
    assert code == 2 and message in err


def test_plan_with_stand_in_corpus_figures_and_parameters(tmp_path, cli):
    """A cluster path and a model whose config cannot be read: --samples, --tokens-per-sample, --params."""
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"base_model": "/nowhere/model", "datasets": [{"path": "s3://b/d.jsonl"}]})
    )
    code, out, err = cli(
        ["plan", str(path), "--samples", "1000", "--tokens-per-sample", "300", "--params", "7e9"]
    )
    assert code == 0, err
    assert "given: N 1,000, 300 tokens a sample, 150 a response (assumed: half)" in out
    assert "7B parameters (given); attention not counted (no model config)" in out
    # iteration 0: 1,000 x 450 tokens x 2 x 7e9 = 6.3e15 FLOPs
    assert "iter 0 scoring (1,000 samples x 2 passes)" in out and "6.30e+15" in out


def test_the_proxy_path_scores_n_with_the_proxy_and_the_window_with_the_base_model():
    from iterit.plan import format_saving

    stats = CorpusStats(100, 10.0, 4.0, "given")
    full = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8)
    # the proxy: P = 100, L = 1, d = 4: 2P + 2 L s d = 280 at s = 10, 232 at s = 4
    rows = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8, proxy=(100, 1, 4), proxy_window=15)
    assert [r.stage for r in rows[:3]] == [
        "iter 0 proxy scoring (100 x 2 passes)",
        "iter 0 window scoring (15 x 2 passes)",
        "iter 0 training (5 samples)",
    ]
    assert (rows[0].tokens, rows[0].flops) == (1400, 100 * (10 * 280 + 4 * 232))
    assert (rows[1].tokens, rows[1].flops) == (210, 15 * (10 * 2320 + 4 * 2128))
    assert rows[2:] == full[1:]  # training and the later iterations are the full path's
    # GPU-hours at 1 FLOP/s: full 2 x 3,171,200/100 x ... ; the saving is the two iteration-0 rows' difference
    text = format_saving(full, rows, peak_flops=3600.0, mfu=1.0, device="X")
    a, b = sum(r.flops for r in full) / 3600**2, sum(r.flops for r in rows) / 3600**2
    assert f"{b:,.3g} X-hours against the full path's {a:,.3g}, {a - b:,.3g} saved ({b / a:.0%}" in text


def test_plan_prints_both_paths_with_a_proxy_and_only_the_full_one_without(tmp_path, cli):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"base_model": "/nowhere/model", "datasets": [{"path": "s3://b/d.jsonl"}]})
    )
    args = ["plan", str(path), "--samples", "1000", "--tokens-per-sample", "300", "--params", "7e9"]
    code, plain, err = cli(args)
    assert code == 0 and "proxy" not in plain
    code, out, err = cli([*args, "--proxy-params", "7e8"])
    assert code == 0, err
    assert out.count("iter 0 training (50 samples)") == 2  # two tables
    assert "iter 0 proxy scoring (1,000 x 2 passes)" in out and "6.30e+14" in out  # a tenth of 6.3e15
    assert "iter 0 window scoring (150 x 2 passes)" in out
    assert "proxy 0.7B parameters (given; its attention not counted)" in out
    assert "proxy path: " in out and "saved" in out
    # a proxy in the config whose config cannot be read: one line naming the stand-in
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": "/nowhere/model",
                "datasets": [{"path": "s3://b/d.jsonl"}],
                "scoring": {"proxy_model": "/no/proxy"},
            }
        )
    )
    code, _, err = cli(args)
    assert code == 2 and "give --proxy-params N to price it without its config" in err


def test_the_proxy_saving_against_hand_computed_totals():
    from iterit.plan import format_saving

    # base P = 1,000, L = 2, d = 8 (2,320 FLOPs a token at s = 10, 2,128 at s = 4); proxy P = 100,
    # L = 1, d = 4 (280 and 232). Full path: 3,171,200 (N = 100 by the base model) + 348,000 (training)
    # + 475,680 (W = 15) + 348,000 = 4,342,880 FLOPs. Proxy path: 372,800 (N by the proxy) + 475,680
    # (W0 = 15 by the base model) + 348,000 + 475,680 + 348,000 = 2,020,160; saved 2,322,720.
    stats = CorpusStats(100, 10.0, 4.0, "given")
    full = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8)
    rows = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8, proxy=(100, 1, 4), proxy_window=15)
    assert sum(r.flops for r in full) == 4_342_880 and sum(r.flops for r in rows) == 2_020_160
    assert rows[0].flops + rows[1].flops == 372_800 + 475_680  # proxy over N + base over W0
    # at 3,600 FLOP/s: hours = FLOPs / 3,600^2; scoring 3,646,880 against 1,324,160 FLOPs
    text = format_saving(full, rows, peak_flops=3600.0, mfu=1.0, device="X")
    assert (
        "proxy path: 0.156 X-hours against the full path's 0.335, 0.179 saved (47% of the full path)" in text
    )
    assert "scoring alone 0.102 against 0.281 (36%)" in text
    # params only (layers = hidden = 0): 2P a token, 100 x 14 tokens x 200 = 280,000
    assert plan_rows(1, 100, 5, 15, stats, 1000, 2, 8, proxy=(100, 0, 0), proxy_window=15)[0].flops == 280_000
    # a window larger than the scorable rows: the base model scores what there is (half of 100 here)
    half = CorpusStats(100, 10.0, 4.0, "given", 0.5)
    big = plan_rows(1, 100, 5, 80, half, 1000, 2, 8, proxy=(100, 1, 4), proxy_window=80)
    assert big[0].stage == "iter 0 proxy scoring (50 x 2 passes)" and big[1].tokens == 50 * 14


def test_without_a_proxy_the_table_is_the_one_plan_printed_before_proxies():
    """Byte for byte the pre-proxy table (iterit/plan.py before issue 27) for the same rows."""
    stats = CorpusStats(100, 10.0, 4.0, "given")
    rows = plan_rows(2, 100, 5, 15, stats, 1000, 2, 8, training_memory="1.0 GiB/GPU")
    assert format_plan(rows, 1e3, "X", 2, 0.5, ["given: N 100"]) == "\n".join(
        [
            "stage                                              tokens     FLOPs      X-hours  wall-clock  memory",
            "-" * 100,
            "iter 0 scoring (100 samples x 2 passes)           1.4e+03  3.17e+06         1.76      53 min  ",
            "iter 0 training (5 samples)                            50  3.48e+05        0.193       6 min  1.0 GiB/GPU",
            "iter 1 scoring (15 samples x 2 passes)                210  4.76e+05        0.264       8 min  ",
            "iter 1 training (5 samples)                            50  3.48e+05        0.193       6 min  1.0 GiB/GPU",
            "total                                            1.71e+03  4.34e+06         2.41      72 min",
            "at 50% of 1e-09 TFLOP/s (X) on 2 device(s); given: N 100. Not counted: model loads, "
            "checkpoints, exports, selection (docs/GPU.md).",
        ]
    )
