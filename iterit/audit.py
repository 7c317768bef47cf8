"""How each selection method treats noise, on your corpus and your model: `iterit audit`.

    iterit audit configs/demo.yaml [--noise mismatch=0.05,duplicate=0.05,...] [--seeds 42,43,44] \\
        [--methods iterit,ifd,random,longest,embedding,iterit+proxy] [--iterations N] [--run RUN] \\
        [--output DIR]

    OUT/clean/                 ingest and iteration 0's scores of the config's corpus, run once (loop's
                               stages and manifest); --run RUN reads RUN's instead
    OUT/seed_<s>/noise/        samples.parquet: the injected rows (ids audit:<kind>:<s>:<j>); labels.parquet
                               (id, kind, source_id, partner_id); scores/ of these rows only (the model)
    OUT/seed_<s>/pool/         the corpus the methods select from, as a run directory: ingest/ (clean +
                               injected samples), iter_0/scores/{clean,noise}/ and a manifest of both done
    OUT/seed_<s>/select/<m>/   selection.jsonl, order.parquet of method m (iteration 0, `iterit select`'s);
                               of a `<m>+proxy` method a run directory: the pool's ingest and proxy
                               scores, iter_0/proxy (the proxy's order), iter_0/scores (the pool's base
                               model scores of the window) and iter_0's selection
    OUT/clean_proxy/, OUT/seed_<s>/noise_proxy/
                               with a `+proxy` method: the proxy's scores of the clean and injected rows,
                               side by side in the pool's iter_0/proxy/scores/{clean,noise}/
    OUT/seed_<s>/<m>/          with --iterations N > 1: an ordinary run of N iterations from the pool
    OUT/audit.json, audit.md, audit_shares.png, audit_ifd.png

A noise kind's share of a method's picks is judged against the share a uniform draw from the scored
pool gives (its expectation): ratio 1 is what random does, below 1 the method avoids that noise. The
interval is a 95% t-interval of the per-seed values. Stopped and started again, an audit redoes
nothing finished: the clean stages resume from their manifest, a seed's noise and scores and each
selection are kept once written.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iterit.config import Config
from iterit.data import SAMPLE_SCHEMA
from iterit.errors import IteritError
from iterit.io import atomic_open, atomic_write_text, filesystem, join, read_jsonl, read_parquet
from iterit.rundir import Manifest, RunDir, ScoreFiles, SelectionFiles, done_record, read_scores, stage_name

NOISE_KINDS = {
    "mismatch": "the instruction of one sample with the response of another",
    "duplicate": "an exact copy of a sample (a new id)",
    "near_duplicate": "a copy whose response has whitespace, case and punctuation changed",
    "truncated": "the response cut mid-sentence (after 25-60% of its words)",
    "same_response": "one response given to 10 instructions",
}
SAME_RESPONSE_GROUP = 10  # instructions that share one response (same_response)
DEFAULT_NOISE = "mismatch=0.05,duplicate=0.05,near_duplicate=0.05,truncated=0.05,same_response=0.05"
COPIES = ("duplicate", "near_duplicate")  # kinds whose source stays in the pool: picked together?
CLEAN = "clean"
SHARED = ("ingest", stage_name(0, "score"))
PROXY_SCORE = stage_name(0, "proxy_score")  # the pool's proxy scores, with a `+proxy` method


def parse_noise(text: str | None) -> dict[str, float]:
    """`mismatch=0.05,duplicate=0.02` -> {kind: fraction of the clean corpus}."""
    out: dict[str, float] = {}
    for item in (text or DEFAULT_NOISE).split(","):
        if not item.strip():
            continue
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if kind not in NOISE_KINDS:
            raise IteritError(f"--noise: unknown kind {kind!r}; expected some of {', '.join(NOISE_KINDS)}")
        try:
            fraction = float(value) if sep else math.nan
        except ValueError:
            fraction = math.nan
        if not 0 <= fraction <= 1:
            raise IteritError(
                f"--noise {item.strip()!r}: give KIND=FRACTION of the clean corpus, e.g. {kind}=0.05"
            )
        out[kind] = fraction
    if not any(out.values()):
        raise IteritError(f"--noise injects nothing: give KIND=FRACTION, e.g. {DEFAULT_NOISE}")
    return out


def parse_audit_methods(text: str | None, cfg: Config) -> list[str]:
    from iterit.compare import parse_methods

    default = "iterit,ifd,random,longest" + (",embedding" if cfg.scoring.embeddings else "")
    methods = parse_methods(text or default, cfg)
    if "full" in methods:
        raise IteritError("--methods full picks every scored sample: its noise share is the pool's; drop it")
    return methods


# --------------------------------------------------------------------------------------------
# The noise: which rows, and what is done to them (pure, seeded)


def noise_plan(n: int, fractions: dict[str, float], seed: int) -> list[tuple[str, int, int]]:
    """(kind, source row, partner row) of each injected row, kinds in NOISE_KINDS order. The source row
    gives the instruction (and, but for mismatch and same_response, the response); the partner gives
    the response of mismatch (never the source itself) and same_response (one per group)."""
    if n < 2:
        raise IteritError(f"the corpus has {n} accepted sample(s): noise needs at least 2")
    rng = np.random.default_rng([seed, 18])
    plan: list[tuple[str, int, int]] = []
    for kind in NOISE_KINDS:
        count = round(fractions.get(kind, 0.0) * n)
        if not count:
            continue
        src = rng.choice(n, size=count, replace=count > n)
        if kind == "mismatch":
            partner = (src + rng.integers(1, n, size=count)) % n
        elif kind == "same_response":
            groups = -(-count // SAME_RESPONSE_GROUP)
            partner = np.repeat(rng.choice(n, size=groups, replace=groups > n), SAME_RESPONSE_GROUP)[:count]
        else:
            partner = src
        plan += [(kind, int(s), int(p)) for s, p in zip(src, partner)]
    return plan


def perturb(text: str, rng: np.random.Generator) -> str:
    """A near duplicate: some words' case flipped, some punctuation dropped, some spaces doubled, a
    trailing space; never the text itself."""
    words = text.split(" ")
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            w = w.lower() if w != w.lower() else w.capitalize()
        elif r < 0.3:
            w = w.rstrip(",.;:!?") or w
        out.append(w)
    spaced = "".join(w + ("  " if rng.random() < 0.1 else " ") for w in out[:-1]) + out[-1]
    return spaced + " "


def truncate(text: str, rng: np.random.Generator) -> str:
    """The response cut after 25-60% of its words, trailing punctuation dropped: mid-sentence."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    if len(ends) < 2:
        return text[: max(1, len(text) // 2)]
    j = int(rng.integers(max(1, round(0.25 * len(ends))), max(2, round(0.6 * len(ends)) + 1)))
    return text[: ends[min(j, len(ends) - 1) - 1]].rstrip(".!?;:,")


def noisy_messages(kind: str, messages: list[dict], partner: list[dict], rng: np.random.Generator) -> list:
    """The messages of one injected row of `kind` (see NOISE_KINDS)."""
    head, response = [dict(m) for m in messages[:-1]], messages[-1]["content"]
    if kind in ("mismatch", "same_response"):
        response = partner[-1]["content"]
    elif kind == "near_duplicate":
        response = perturb(response, rng)
    elif kind == "truncated":
        response = truncate(response, rng)
    return [*head, {"role": "assistant", "content": response}]


def _rows_of(samples_path: str, wanted: np.ndarray) -> dict[int, dict]:
    """{row: {id, messages}} of those rows of the samples file, read group by group (the file is never
    whole in memory; what is kept is the injected rows' sources)."""
    wanted = np.unique(wanted)
    out, offset = {}, 0
    fs, p = filesystem(samples_path)
    with fs.open(p, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=["id", "messages"]):
            lo, hi = np.searchsorted(wanted, [offset, offset + batch.num_rows])
            if hi > lo:
                rows = batch.take(pa.array(wanted[lo:hi] - offset)).to_pylist()
                out.update(zip(wanted[lo:hi].tolist(), rows))
            offset += batch.num_rows
    return out


def write_noise(samples_path: str, n: int, fractions: dict[str, float], seed: int, out_dir: str) -> dict:
    """OUT/samples.parquet (SAMPLE_SCHEMA) and OUT/labels.parquet of the injected rows; counts by kind."""
    plan = noise_plan(n, fractions, seed)
    rows = _rows_of(samples_path, np.array([r for _, s, p in plan for r in (s, p)], dtype=np.int64))
    rng = np.random.default_rng([seed, 19])
    samples, labels, count = [], [], Counter()
    for kind, s, p in plan:
        sid = f"audit:{kind}:{seed}:{count[kind]}"
        count[kind] += 1
        msgs = noisy_messages(kind, rows[s]["messages"], rows[p]["messages"], rng)
        samples.append({"id": sid, "messages": msgs, "source": f"audit:{kind}", "row": s})
        labels.append({"id": sid, "kind": kind, "source_id": rows[s]["id"], "partner_id": rows[p]["id"]})
    with atomic_open(join(out_dir, "labels.parquet")) as f:
        pq.write_table(pa.Table.from_pylist(labels), f)
    with atomic_open(join(out_dir, "samples.parquet")) as f:  # written last: its presence = done
        pq.write_table(pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), f, compression="zstd")
    return dict(count)


# --------------------------------------------------------------------------------------------
# The figures (pure): one seed's, then across seeds


def seed_figures(
    kind: np.ndarray, ifd: np.ndarray, picks: dict[str, list[np.ndarray]], source: np.ndarray | None = None
) -> dict:
    """One seed's figures. `kind`: the label of each row of the pool ("clean" or a noise kind); `ifd`:
    its IFD under the base model (NaN: rejected at scoring); picks[method][e]: the pool rows the method
    picked in iteration e; `source`: for copies, the pool row of their original (-1 otherwise).

    Per kind: rows, scored, removed (finite IFD >= 1: never a candidate of iterit, ifd or embedding),
    expected (its share of the scored rows: what a uniform draw picks) and IFD quantiles. Per method and
    iteration: picks, each kind's share of them and its ratio to the expectation, and for copies the
    share picked together with their original."""
    kind, ifd = np.asarray(kind), np.asarray(ifd, dtype=np.float64)
    scored = np.isfinite(ifd)
    kinds = [CLEAN, *[k for k in NOISE_KINDS if np.any(kind == k)]]
    per_kind = {}
    for k in kinds:
        mine = kind == k
        vals = ifd[mine & scored]
        per_kind[k] = {
            "rows": int(mine.sum()),
            "scored": int(vals.size),
            "removed": int((vals >= 1).sum()),
            "candidates": int((vals < 1).sum()),
            "expected": float(vals.size / max(1, scored.sum())),
            "ifd_quantiles": np.quantile(vals, [0.1, 0.25, 0.5, 0.75, 0.9]).tolist() if vals.size else None,
        }
    methods = {}
    for m, iterations in picks.items():
        per_iter = []
        for e, rows in enumerate(iterations):
            rows = np.asarray(rows, dtype=np.int64)
            picked_kind = kind[rows]
            share = {k: float(np.mean(picked_kind == k)) if rows.size else 0.0 for k in kinds}
            entry = {
                "picks": int(rows.size),
                "share": share,
                "ratio": {
                    k: (share[k] / per_kind[k]["expected"] if per_kind[k]["expected"] else None)
                    for k in kinds
                },
                "noise_share": 1.0 - share[CLEAN],
                # the share of these picks that iteration 0 picked too: what re-scoring changed
                "kept_from_iteration_0": float(np.isin(rows, iterations[0]).mean())
                if e and rows.size
                else None,
                # of the kind's rows that pass the IFD < 1 filter, the share picked
                "of_candidates": {
                    k: (
                        float(np.sum((picked_kind == k) & (ifd[rows] < 1)) / per_kind[k]["candidates"])
                        if per_kind[k]["candidates"]
                        else None
                    )
                    for k in kinds
                },
            }
            if source is not None:
                chosen = np.zeros(len(kind), dtype=bool)
                chosen[rows] = True
                for k in COPIES:
                    if k in kinds:
                        src = source[rows[picked_kind == k]]  # -1: the original was rejected
                        entry.setdefault("with_original", {})[k] = (
                            float(np.mean((src >= 0) & chosen[src])) if src.size else None
                        )
            per_iter.append(entry)
        methods[m] = per_iter
    return {"kinds": per_kind, "methods": methods}


def interval(values: Sequence[float | None], top: float = math.inf) -> dict:
    """mean and a 95% t-interval over seeds (low = high = mean for one seed), clipped to [0, top] (the
    figures are shares, ratios and counts); None values are left out."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "low": None, "high": None, "values": list(values)}
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": mean, "low": mean, "high": mean, "values": list(values)}
    from scipy.stats import t

    half = t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return {"mean": mean, "low": max(0.0, mean - half), "high": min(top, mean + half), "values": list(values)}


def across_seeds(per_seed: list[dict]) -> dict:
    """The seeds' figures side by side: every number becomes interval() of its per-seed values."""
    kinds = list(per_seed[0]["kinds"])
    out = {"kinds": {}, "methods": {}}
    for k in kinds:
        rows = [s["kinds"][k] for s in per_seed]
        out["kinds"][k] = {
            f: interval([r[f] for r in rows]) for f in ("rows", "scored", "removed", "candidates")
        } | {
            "expected": interval([r["expected"] for r in rows], top=1),
            "removed_share": interval([r["removed"] / r["scored"] if r["scored"] else None for r in rows], 1),
        }
    for m in per_seed[0]["methods"]:
        iters = []
        for e in range(len(per_seed[0]["methods"][m])):
            runs = [s["methods"][m][e] for s in per_seed]
            entry = {
                "picks": interval([r["picks"] for r in runs]),
                "noise_share": interval([r["noise_share"] for r in runs], top=1),
                "share": {k: interval([r["share"][k] for r in runs], top=1) for k in kinds},
                "ratio": {k: interval([r["ratio"][k] for r in runs]) for k in kinds},
                "of_candidates": {k: interval([r["of_candidates"][k] for r in runs], top=1) for k in kinds},
                "kept_from_iteration_0": interval([r["kept_from_iteration_0"] for r in runs], top=1),
            }
            if "with_original" in runs[0]:
                entry["with_original"] = {
                    k: interval([r["with_original"][k] for r in runs], top=1)
                    for k in runs[0]["with_original"]
                }
            iters.append(entry)
        out["methods"][m] = iters
    return out


# --------------------------------------------------------------------------------------------
# The stages on files


def clean_stages(cfg: Config, out: str, run_dir: str | None, log) -> tuple[RunDir, dict]:
    """The clean corpus's ingest and iteration 0 scores by the base model, of every row: RUN's (--run)
    or OUT/clean's, run once (compare's shared stages: the full path, even with a proxy model)."""
    from iterit.compare import shared_stages
    from iterit.loop import read_run_config

    if not run_dir:
        path = join(out, "clean")
        return RunDir(path), shared_stages(cfg.model_copy(update={"output_dir": path}), path, log)
    run = RunDir(run_dir)
    saved = read_run_config(run)
    for key in ("base_model", "sequence_len", "chat_template", "system_prompt"):
        if getattr(saved, key) != getattr(cfg, key):
            raise IteritError(
                f"--run {run_dir} was scored with {key} {getattr(saved, key)!r}, the config says "
                f"{getattr(cfg, key)!r}: the injected rows would be scored differently; audit "
                "without --run, or with that run's config"
            )
    if saved.scoring.proxy_model:
        raise IteritError(
            f"--run {run_dir} ran with the proxy {saved.scoring.proxy_model}: its iteration 0 scores are "
            "the proxy's window only, the audit needs every row scored by the base model; audit "
            "without --run"
        )
    manifest = Manifest.load(run)
    for name in SHARED:
        if manifest.done(name) is None:
            raise IteritError(
                f"--run {run_dir}: stage {name} is not done; finish it with iterit run --resume"
            )
    return run, manifest.data


def scored_once(cfg: Config, samples: str, out_dir: str, what: str, log, fit_under: Config | None = None):
    """The score summary of OUT_DIR (rundir.ScoreFiles), scoring SAMPLES with cfg's model only where
    it has none: a finished folder is kept, one stopped halfway resumes (run_scoring)."""
    from iterit.scoring.pipeline import run_scoring

    fs, p = filesystem(ScoreFiles(out_dir).summary)
    if not fs.exists(p):
        log(f"[audit] {what}")
        run_scoring(cfg, samples, out_dir, fit_under=fit_under, log=log)
    with fs.open(p, "r") as f:
        return json.load(f)


def _copy_tree(src: str, dst: str) -> None:
    """Every finished file under src to the same place under dst (file by file, not through memory)."""
    fs, root = filesystem(src)
    if fs.isfile(root):  # an older run's single scores.parquet
        root, found = root.rsplit("/", 1)[0], [root]
    else:
        found = fs.find(root)
    for f in found:
        rel = f[len(root.rstrip("/")) + 1 :]
        if ".tmp-" in rel or ".checkpoint" in rel:
            continue
        with fs.open(f, "rb") as fin, atomic_open(join(dst, rel), "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)


def merge_scores(out: ScoreFiles, parts: list[tuple[str, ScoreFiles, dict]]) -> dict:
    """Score folders side by side as one: each part's scores under OUT/scores/<name>/ (copied file by
    file), their rejects in one file, their summaries summed; returns (and writes) the summary."""
    for name, files, _ in parts:
        _copy_tree(files.written, join(out.scores, name))
    summaries = [s for _, _, s in parts]
    reasons = sum((Counter(s.get("rejected_by_reason", {})) for s in summaries), Counter())
    result = {
        **summaries[0],
        **{k: sum(s.get(k, 0) for s in summaries) for k in ("rows", "scored", "rejected", "tokens")},
        "rejected_by_reason": dict(reasons),
        "scores": out.scores,
        "rejects": out.rejects,
    }
    rejects = [r for _, files, _ in parts for r in read_jsonl(files.rejects)]
    atomic_write_text(out.rejects, "".join(json.dumps(r) + "\n" for r in rejects))
    atomic_write_text(out.summary, json.dumps(result, indent=2) + "\n")
    return result


def build_pool(
    clean: RunDir, clean_manifest: dict, noise_dir: str, pool: RunDir, noise_summary: dict
) -> dict:
    """The pool as a run directory whose ingest and iteration 0 scoring are done: samples = clean rows
    then injected rows (streamed group by group), scores = both folders. Returns its manifest data."""
    done = Manifest.load(pool).data if pool.exists() else None
    if done is not None:
        return done
    ing = clean_manifest["stages"]["ingest"]["result"]
    samples = join(pool.ingest, "samples.parquet")
    with atomic_open(samples) as fout, pq.ParquetWriter(fout, SAMPLE_SCHEMA, compression="zstd") as w:
        for path in (ing["samples"], join(noise_dir, "samples.parquet")):
            fs, p = filesystem(path)
            with fs.open(p, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                    w.write_table(pa.Table.from_batches([batch]).cast(SAMPLE_SCHEMA))
    injected = noise_summary["rows"]
    ing_result = {
        **ing,
        "read": ing["read"] + injected,
        "accepted": ing["accepted"] + injected,
        "samples": samples,
    }
    atomic_write_text(join(pool.ingest, "summary.json"), json.dumps(ing_result, indent=2) + "\n")
    atomic_write_text(join(pool.ingest, "rejects.jsonl"), "")
    s0 = clean_manifest["stages"][SHARED[1]]["result"]
    parts = [("clean", clean.scoring(0), s0), ("noise", ScoreFiles(noise_dir), noise_summary)]
    score_result = merge_scores(pool.scoring(0), parts)
    stages = {SHARED[0]: done_record(ing_result), SHARED[1]: done_record(score_result)}
    return Manifest.create(pool, seed=0, iterations=1, stages=stages).data


def seed_picks(
    cfg: Config, out: str, seed: int, pool: RunDir, pool_manifest: dict, methods, iterations, eos, log
):
    """picks[method][e]: the ids each method picked in each iteration, from the pool: `iterit select`'s
    selection (one iteration), or an ordinary run of `iterations` from the pool (loop.run)."""
    from iterit.compare import run_config, seed_run, split_method
    from iterit.loop import run
    from iterit.selection.stage import run_selection

    picks = {}
    seed_dir = join(out, f"seed_{seed}")
    samples = pool_manifest["stages"]["ingest"]["result"]["samples"]
    for m in methods:
        if iterations <= 1 and split_method(m)[1]:
            picks[m] = [proxy_picks(cfg, seed_dir, seed, m, pool, pool_manifest, eos, log)]
            continue
        if iterations <= 1:
            files = SelectionFiles(join(seed_dir, "select", m))
            fs, p = filesystem(files.order)
            if not fs.exists(p):
                log(f"[audit] seed {seed}: {m} selects")
                run_selection(
                    samples,
                    pool.scoring(0).written,
                    cfg.selection.num_selected,
                    m,
                    files.dir,
                    decay=cfg.selection.decay,
                    eos_token=eos,
                    seed=seed,
                    tfidf_mode=cfg.selection.tfidf,
                    log=log,
                )
            picks[m] = [pa.array(files.read_picks(), pa.string())]
            continue
        rc = run_config(cfg.model_copy(update={"iterations": iterations}), out, seed, m)  # OUT/seed_<s>/<m>
        rd = RunDir(rc.output_dir)
        if not rd.exists():
            seed_run(rc, pool.path, pool_manifest)
        if Manifest.load(rd).done("report") is None:
            log(f"[audit] seed {seed}: {m} runs {iterations} iterations")
            run(rc, resume=rc.output_dir, log=log)
        picks[m] = [pa.array(rd.selection(e).read_picks(), pa.string()) for e in range(iterations)]
    return picks


def pool_proxy_scores(cfg: Config, seed: int, seed_dir: str, pool: RunDir, clean_proxy, log) -> dict:
    """The pool's iter_0/proxy_score stage (the `+proxy` methods' iteration 0): the proxy's scores of
    the clean rows (`clean_proxy`: their folder and summary, scored once for every seed) and of this
    seed's injected rows (OUT/seed_<s>/noise_proxy/). Returns the pool's manifest data."""
    noise_proxy = join(seed_dir, "noise_proxy")
    summary = scored_once(
        cfg.proxy(), join(seed_dir, "noise", "samples.parquet"), noise_proxy,
        f"seed {seed}: the proxy scores the injected rows", log, fit_under=cfg,
    )  # fmt: skip
    parts = [
        ("clean", ScoreFiles(clean_proxy[0]), clean_proxy[1]),
        ("noise", ScoreFiles(noise_proxy), summary),
    ]
    manifest = Manifest.load(pool)
    manifest.run(PROXY_SCORE, lambda: merge_scores(pool.proxy_scoring(), parts), log)
    return manifest.data


def proxy_picks(
    cfg: Config, seed_dir: str, seed: int, method: str, pool: RunDir, pool_manifest: dict, eos, log
) -> pa.Array:
    """Iteration 0 of a `+proxy` method on the pool, in OUT/seed_<s>/select/<m>/ (a run directory),
    the loop's stages but one: the proxy orders all N, the method orders the first W of that order by
    the base model's scores, which are the pool's (the audit scored every row with the base model:
    a second pass over the window would give the same numbers)."""
    from iterit.compare import run_config, seed_run
    from iterit.loop import copy_window_scores, proxy_order, select_stage

    rc = run_config(cfg.model_copy(update={"iterations": 1}), seed_dir, seed, method)
    rc = rc.model_copy(update={"output_dir": join(seed_dir, "select", method)})
    rd = RunDir(rc.output_dir)
    if not rd.exists():
        seed_run(rc, pool.path, pool_manifest)
    manifest = Manifest.load(rd)
    samples = pool_manifest["stages"]["ingest"]["result"]["samples"]
    if manifest.done(stage_name(0, "select")) is None:
        log(f"[audit] seed {seed}: {method} selects")

    def window_scores() -> dict:
        n = pool_manifest["stages"]["ingest"]["result"]["accepted"]
        window = proxy_order(rd).slice(0, rc.proxy_window(n)).to_pylist()
        return copy_window_scores(
            pool.scoring(0).written, rd.scoring(0), window, "the pool's base-model scores"
        )

    manifest.run(
        stage_name(0, "proxy_select"), lambda: select_stage(rc, rd, 0, samples, eos, log, proxy=True), log
    )
    manifest.run(stage_name(0, "score"), window_scores, log)
    manifest.run(stage_name(0, "select"), lambda: select_stage(rc, rd, 0, samples, eos, log), log)
    return pa.array(rd.selection(0).read_picks(), pa.string())


def pool_figures(
    pool: RunDir, labels: pa.Table, picks: dict[str, list[pa.Array]], clean_rows: int
) -> tuple[dict, dict]:
    """seed_figures on the pool's files, and the IFD of each kind's scored rows (for the plot).
    `clean_rows`: the clean corpus's accepted rows (those rejected at scoring have no score row)."""
    scores = read_scores(pool.scoring(0).written, ["id", "ifd"])
    ids = scores.column("id").combine_chunks().cast(pa.string())
    at = pc.index_in(ids, value_set=labels.column("id"))
    kind = np.array(
        pc.fill_null(labels.column("kind").take(at), CLEAN).to_numpy(zero_copy_only=False), dtype=object
    )
    ifd = scores.column("ifd").to_numpy().astype(np.float64)
    # rejected at scoring: rows without a score count in `rows`, not in `scored`
    missing = pc.invert(pc.is_in(labels.column("id"), value_set=ids))
    lost = labels.filter(missing).column("kind").to_numpy(zero_copy_only=False).tolist()
    lost += [CLEAN] * (clean_rows - int(np.sum(kind == CLEAN)))
    kind = np.concatenate([kind, np.array(lost, dtype=object)])
    ifd = np.concatenate([ifd, np.full(len(lost), np.nan)])
    src_at = pc.index_in(labels.column("source_id"), value_set=ids)
    source = np.full(len(kind), -1, dtype=np.int64)
    noisy_rows = at.is_valid().to_numpy(zero_copy_only=False)
    label_row = at.drop_null().to_numpy()
    source[np.flatnonzero(noisy_rows)] = pc.fill_null(src_at, -1).to_numpy()[label_row]
    rows = {
        m: [pc.index_in(p, value_set=ids).drop_null().to_numpy() for p in per] for m, per in picks.items()
    }
    ifd_by_kind = {k: ifd[(kind == k) & np.isfinite(ifd)].tolist() for k in dict.fromkeys(kind.tolist())}
    return seed_figures(kind, ifd, rows, source), ifd_by_kind


# --------------------------------------------------------------------------------------------
# The table and the plots


def _ci(s: dict, spec: str = ".2f", pct: bool = False) -> str:
    if s["mean"] is None:
        return "-"
    f = (lambda x: f"{100 * x:{spec}}%") if pct else (lambda x: format(x, spec))
    return f(s["mean"]) if s["low"] == s["high"] else f"{f(s['mean'])} [{f(s['low'])}, {f(s['high'])}]"


def to_markdown(data: dict) -> str:
    summ, kinds = data["summary"], list(data["summary"]["kinds"])
    noise = [k for k in kinds if k != CLEAN]
    lines = [
        "# Noise audit",
        "",
        f"Base model `{data['base_model']}`; {data['clean_samples']:,} clean samples, "
        f"{data['injected']:,} injected per seed; k = {data['k']:,} picks per iteration "
        f"(ratio {data['ratio']} of the pool); seeds {', '.join(map(str, data['seeds']))}. "
        "Mean over seeds with a 95% t-interval [low, high].",
        *(
            [
                "",
                f"`+proxy` methods: the proxy `{data['proxy_model']}` scores every row and orders them; "
                f"the method orders its first W = {data['proxy_window']:,} candidates by the base model's "
                "scores. A row the proxy finds at IFD >= 1 is left out of that window, whatever the base "
                "model finds.",
            ]
            if data.get("proxy_model")
            else []
        ),
        "",
        "## The noise, and what the IFD >= 1 rule removes",
        "",
        "Removed: scored rows with IFD >= 1, never candidates of iterit, ifd or embedding (random and "
        "longest draw from every scored row). Median IFD under the base model.",
        "",
        "| kind | what it is | rows | scored | removed by IFD >= 1 | median IFD |",
        "|---|---|---|---|---|---|",
    ]
    for k in kinds:
        s = summ["kinds"][k]
        medians = [q[2] for q in (ps["kinds"][k]["ifd_quantiles"] for ps in data["per_seed"]) if q]
        median = f"{statistics.median(medians):.3f}" if medians else "-"  # none scored: all rejected
        lines.append(
            f"| {k} | {NOISE_KINDS.get(k, 'the corpus as given')} | {_ci(s['rows'], ',.0f')} | "
            f"{_ci(s['scored'], ',.0f')} | {_ci(s['removed'], ',.1f')} "
            f"({_ci(s['removed_share'], '.1f', True)}) "
            f"| {median} |"
        )
    for e in range(data["iterations"]):
        title = "" if data["iterations"] == 1 else f", iteration {e}"
        lines += [
            "",
            f"## Share of picks against the random expectation{title}",
            "",
            "Each noise kind's share of the picks, and (×) its ratio to the kind's share of the scored "
            "pool: ×1 is a uniform draw, below 1 the method avoids that noise.",
            "",
            "| method | noise in picks | "
            + " | ".join(noise)
            + (" | also picked in iteration 0 |" if e else " |"),
            "|---" * (len(noise) + 2 + bool(e)) + "|",
            "| expected (scored pool) | "
            + _ci(interval([1 - ps["kinds"][CLEAN]["expected"] for ps in data["per_seed"]]), ".1f", True)
            + " | "
            + " | ".join(_ci(summ["kinds"][k]["expected"], ".1f", True) for k in noise)
            + (" | - |" if e else " |"),
        ]
        for m, per in summ["methods"].items():
            s = per[e]
            cells = [f"{_ci(s['share'][k], '.1f', True)} (×{_ci(s['ratio'][k])})" for k in noise]
            cells += [_ci(s["kept_from_iteration_0"], ".0f", True)] if e else []
            lines.append(f"| {m} | {_ci(s['noise_share'], '.1f', True)} | " + " | ".join(cells) + " |")
    last = data["iterations"] - 1
    lines += [
        "",
        "## Of the rows that pass the IFD < 1 filter, the share picked"
        + (f" (iteration {last})" if last else ""),
        "",
        "The candidates of iterit, ifd and embedding: each kind's rows with IFD < 1 under the base model "
        "(mean count per seed "
        "in the header), and the share of them each method picked. Against the clean rows' share, it "
        "shows whether a method goes looking for the noise the filter let through.",
        "",
        "| method | "
        + " | ".join(f"{k} ({_ci(summ['kinds'][k]['candidates'], ',.1f')})" for k in kinds)
        + " |",
        "|---" * (len(kinds) + 1) + "|",
    ]
    for m, per in summ["methods"].items():
        cells = [_ci(per[last]["of_candidates"][k], ".1f", True) for k in kinds]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    copies = [k for k in COPIES if k in noise]
    if copies:
        lines += [
            "",
            "## Copies picked together with their original",
            "",
            "Of the picked copies, the share whose original was picked too (the same text trained twice).",
            "",
            "| method | " + " | ".join(copies) + " |",
            "|---" * (len(copies) + 1) + "|",
        ]
        for m, per in summ["methods"].items():
            wo = per[last].get("with_original", {})
            lines.append(f"| {m} | " + " | ".join(_ci(wo[k], ".0f", True) for k in copies) + " |")
    lines += [
        "",
        "Plots: audit_shares.png (ratio to the expectation per method and kind), audit_ifd.png "
        "(IFD by kind).",
    ]
    return "\n".join(lines) + "\n"


def console_lines(data: dict) -> list[str]:
    """One line per method: the noise share of its last iteration's picks and each kind's ratio."""
    summ, noise = data["summary"], [k for k in data["summary"]["kinds"] if k != CLEAN]
    expected = interval([1 - ps["kinds"][CLEAN]["expected"] for ps in data["per_seed"]])["mean"]
    out = []
    for m, per in summ["methods"].items():
        s = per[-1]
        ratios = ", ".join(
            f"{k} ×{s['ratio'][k]['mean']:.2f}" for k in noise if s["ratio"][k]["mean"] is not None
        )
        out.append(
            f"{m}: noise {100 * s['noise_share']['mean']:.1f}% of picks "
            f"(a uniform draw: {100 * expected:.1f}%); {ratios}"
        )
    return out


def plot_shares(data: dict) -> bytes:
    """Grouped bars: per noise kind, each method's ratio to the expectation with its interval."""
    from matplotlib.figure import Figure

    summ, noise = data["summary"], [k for k in data["summary"]["kinds"] if k != CLEAN]
    methods = list(summ["methods"])
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        s = summ["methods"][m][-1]["ratio"]
        means = [s[k]["mean"] or 0.0 for k in noise]
        err = [
            [max(0.0, (s[k]["mean"] or 0) - (s[k]["low"] or 0)) for k in noise],
            [max(0.0, (s[k]["high"] or 0) - (s[k]["mean"] or 0)) for k in noise],
        ]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(noise))]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=m)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="random expectation")
    ax.set_xticks(range(len(noise)), noise)
    ax.set(
        ylabel="share of picks / share of pool",
        title=f"Noise picked per method (mean, 95% interval over {len(data['seeds'])} seeds)",
    )
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_ifd(ifd_by_kind: dict[str, list[float]]) -> bytes:
    """IFD under the base model of the clean rows and each noise kind (all seeds), the rule's 1 marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    kinds = [k for k in ifd_by_kind if ifd_by_kind[k]]
    ax.boxplot([ifd_by_kind[k] for k in kinds], tick_labels=kinds, showfliers=False)
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="IFD = 1 (removed at and above)")
    ax.set(ylabel="IFD under the base model", title="IFD of clean and injected rows")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The whole audit


def audit(
    cfg: Config,
    noise: dict[str, float],
    seeds: Sequence[int],
    methods: Sequence[str],
    output: str | None = None,
    iterations: int = 1,
    run_dir: str | None = None,
    log=print,
) -> dict:
    """Inject, score the injected rows, select with every method, count; OUT/audit.{md,json} and plots."""
    from iterit import cluster
    from iterit.compare import split_method
    from iterit.loop import preflight
    from iterit.templates import load_tokenizer

    if iterations < 1:
        raise IteritError(f"--iterations {iterations}: give 1 (select only) or more (train and re-score)")
    out = cluster.absolute(output or join(cfg.output_dir, "audit"))
    cluster.connect()
    log(cluster.logs_line(out))
    if not run_dir:
        preflight(cfg.model_copy(update={"output_dir": join(out, "clean")}), RunDir(join(out, "clean")), log)
    clean, clean_manifest = clean_stages(cfg, out, run_dir, log)
    ing = clean_manifest["stages"]["ingest"]["result"]
    scored = clean_manifest["stages"][SHARED[1]]["result"]["scored"]
    log(
        f"[audit] clean corpus: {ing['accepted']:,} samples, {scored:,} scored ({clean.path}); "
        f"{len(seeds)} seed(s), methods {', '.join(methods)}"
    )
    eos = load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code).eos_token
    proxied = any(split_method(m)[1] for m in methods)
    if proxied:
        clean_proxy = join(out, "clean_proxy")
        clean_proxy_summary = scored_once(
            cfg.proxy(), ing["samples"], clean_proxy, "the proxy scores the clean corpus", log, fit_under=cfg
        )
    per_seed, ifd_by_kind, injected = [], {}, 0
    for seed in seeds:
        seed_dir = join(out, f"seed_{seed}")
        noise_dir = join(seed_dir, "noise")
        fs, p = filesystem(join(noise_dir, "samples.parquet"))
        if not fs.exists(p):
            counts = write_noise(ing["samples"], ing["accepted"], noise, seed, noise_dir)
            log(f"[audit] seed {seed}: injected " + ", ".join(f"{n:,} {k}" for k, n in counts.items()))
        noise_summary = scored_once(
            cfg, join(noise_dir, "samples.parquet"), noise_dir, f"seed {seed}: scoring the injected rows", log
        )
        pool = RunDir(join(seed_dir, "pool"))
        pool_manifest = build_pool(clean, clean_manifest, noise_dir, pool, noise_summary)
        if proxied:
            pool_manifest = pool_proxy_scores(
                cfg, seed, seed_dir, pool, (clean_proxy, clean_proxy_summary), log
            )
        picks = seed_picks(cfg, out, seed, pool, pool_manifest, methods, iterations, eos, log)
        labels = read_parquet(join(noise_dir, "labels.parquet"))
        figures, ifd = pool_figures(pool, labels, picks, ing["accepted"])
        per_seed.append({"seed": seed, **figures})
        for k, vals in ifd.items():
            if k != CLEAN or CLEAN not in ifd_by_kind:  # the clean rows are the same in every seed
                ifd_by_kind.setdefault(k, []).extend(vals)
        injected = labels.num_rows
    n_pool = ing["accepted"] + injected
    data = {
        "output": out,
        "base_model": cfg.base_model,
        "proxy_model": cfg.scoring.proxy_model if proxied else None,
        "proxy_window": cfg.proxy_window(n_pool) if proxied else None,
        "clean_run": clean.path,
        "clean_samples": ing["accepted"],
        "noise": noise,
        "injected": injected,
        "seeds": list(seeds),
        "methods": list(methods),
        "iterations": iterations,
        "ratio": cfg.selection.ratio,
        "k": cfg.selection.num_selected(n_pool),
        "summary": across_seeds(per_seed),
        "per_seed": per_seed,
    }
    atomic_write_text(join(out, "audit.json"), json.dumps(data, indent=2) + "\n")
    atomic_write_text(join(out, "audit.md"), to_markdown(data))
    for name, png in (("audit_shares.png", plot_shares(data)), ("audit_ifd.png", plot_ifd(ifd_by_kind))):
        with atomic_open(join(out, name), "wb") as f:
            f.write(png)
    return data
