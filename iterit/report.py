"""The run report: RUN/report/report.md and report.html (the same page), with PNG plots beside them.

    iterit report RUN   ->   RUN/report/{report.md, report.html, rows.png, ifd.png, ..., timings.png}

Everything comes from the run directory (docs/architecture.md section 3), so a run can be reported
while it is going, after it stopped or after it failed: the report draws what exists and lists what
is missing.
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from iterit.errors import IteritError
from iterit.io import atomic_open, atomic_write_text, filesystem, join
from iterit.rundir import ITERATION_STAGES, PROXY_STAGES, RunDir, read_scores, score_parts, stage_name

KIND_COLORS = {"ingest": "tab:gray", "score": "tab:blue", "select": "tab:orange", "train": "tab:green"}
MAX_POINTS = 20_000  # scatter points per panel: more only blur into one blot and slow the PNG down

# --------------------------------------------------------------------------------------------
# Reading the run: any file may be absent (its stage has not run yet); reading never raises


@dataclass
class Iteration:
    e: int
    ids: np.ndarray | None  # (scored,) ids of scores.parquet: all of N at e = 0, the re-scored window later
    ifd: np.ndarray | None  # (scored,) float64, aligned with ids
    summary: dict | None  # score_summary.json
    selected: list[str] | None  # selection.jsonl ids, in pick order
    order: dict | None  # order.parquet as arrays: id, position, status (the full corpus order after e)
    metrics: list[dict] | None  # train_metrics.jsonl, one row per optimizer step


@dataclass
class Run:
    path: str
    manifest: dict
    config: dict
    ingest: dict
    iters: list[Iteration]
    notes: list[str]  # files that exist but could not be read
    proxy: dict | None = None  # with scoring.proxy_model: the proxy's scores (id, ifd) of all N

    def stage(self, name: str) -> dict:
        return self.manifest.get("stages", {}).get(name) or {}

    def result(self, name: str) -> dict:
        return self.stage(name).get("result") or {}

    @property
    def planned(self) -> int:
        return self.manifest.get("iterations") or self.config.get("iterations") or len(self.iters)


def _read(path: str, notes: list[str], parse=lambda text: text):
    """parse(file text), or None when the file is absent or unreadable (noted)."""
    fs, p = filesystem(path)
    try:
        with fs.open(p, "r", encoding="utf-8") as f:
            return parse(f.read())
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged file is reported on the page, not fatal
        notes.append(f"could not read {path}: {type(e).__name__}: {e}")


def _jsonl(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the last line of train_metrics.jsonl while training still appends to it
    return rows


def _columns(path: str, columns: list[str], notes: list[str]) -> dict | None:
    # Only the named columns: scores may carry an embedding per sample (gigabytes at 1M rows).
    fs, p = filesystem(path)
    try:
        if fs.isdir(p):  # a scores folder: its scored rows
            t = read_scores(path, columns) if score_parts(path) else None
            return None if t is None else {c: t.column(c).to_numpy() for c in columns}
        with fs.open(p, "rb") as f:
            t = pq.read_table(f, columns=columns)
        return {c: t.column(c).to_numpy() for c in columns}
    except FileNotFoundError:
        return None
    except Exception as e:
        notes.append(f"could not read {path}: {type(e).__name__}: {e}")


def load_run(run_dir: str) -> Run:
    notes: list[str] = []
    rd = RunDir(run_dir)
    manifest = _read(rd.manifest, notes, json.loads)
    if notes:
        raise IteritError(notes[0])
    if manifest is None:
        raise IteritError(
            f"{run_dir}: not an iterit run directory (no manifest.json); give the output_dir of a run"
        )
    config = _read(rd.config, notes, yaml.safe_load)
    config = config if isinstance(config, dict) else {}
    planned = manifest.get("iterations") or config.get("iterations") or 0
    iters = []
    for e in range(max([planned, *(f + 1 for f in rd.iterations_on_disk())])):
        scoring, selection_files = rd.scoring(e), rd.selection(e)
        scores = _columns(scoring.written, ["id", "ifd"], notes) or {}
        selection = _read(selection_files.selection, notes, _jsonl)
        iters.append(
            Iteration(
                e,
                scores.get("id"),
                None if not scores else scores["ifd"].astype(np.float64),
                _read(scoring.summary, notes, json.loads),
                None
                if selection is None
                else [str(r["id"]) for r in selection if isinstance(r, dict) and "id" in r],
                _columns(selection_files.order, ["id", "position", "status"], notes),
                _read(rd.train_metrics(e), notes, _jsonl),
            )
        )
    run = Run(run_dir, manifest, config, {}, iters, notes)
    if (config.get("scoring") or {}).get("proxy_model"):
        run.proxy = _columns(rd.proxy_scoring().written, ["id", "ifd"], notes)
    run.ingest = _read(rd.ingest_summary, notes, json.loads) or run.result("ingest")
    return run


# --------------------------------------------------------------------------------------------
# Numbers derived from the files


def overlap_matrix(selections: list[list[str]]) -> np.ndarray:
    """(n, n): |S_i & S_j| / k, k = the larger of the two selections (the budget k when both are full)."""
    sets = [set(s) for s in selections]
    return np.array([[len(a & b) / max(len(a), len(b), 1) for b in sets] for a in sets])


def _selected_mask(it: Iteration) -> np.ndarray:
    chosen = set(it.selected or ())
    return np.fromiter((i in chosen for i in it.ids), bool, len(it.ids))


def _positions(order: dict, ids: np.ndarray) -> np.ndarray:
    """Each id's position in `order`, -1 where it is not there."""
    idx = pc.index_in(pa.array(ids, pa.string()), value_set=pa.array(order["id"], pa.string()))
    idx = pc.fill_null(idx, -1).to_numpy()
    return np.where(idx >= 0, order["position"][np.maximum(idx, 0)], -1)


def _mean(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else None


def _seconds(st: dict) -> float | None:
    s = st.get("seconds", (st.get("result") or {}).get("seconds"))
    return float(s) if isinstance(s, (int, float)) else None


def _fmt(x, spec: str = ",") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _iteration_rows(run: Run) -> list[list[str]]:
    """One table row per iteration that has anything on disk or in the manifest."""
    rows, prev = [], None
    for it in run.iters:
        sel, res = it.selected, run.result(stage_name(it.e, "select"))
        if it.ids is None and sel is None and not it.metrics and not run.stage(stage_name(it.e, "score")):
            continue
        scored = len(it.ids) if it.ids is not None else (it.summary or {}).get("scored")
        cands = (
            int(np.isin(it.order["status"], ["selected", "candidate"]).sum())
            if it.order
            else res.get("candidates")
        )
        means = ["-", "-"]
        if it.ids is not None and sel is not None:
            m = _selected_mask(it)
            means = [_fmt(_mean(it.ifd[m]), ".3f"), _fmt(_mean(it.ifd[~m]), ".3f")]
        overlap = moved = "-"
        if sel is not None and prev is not None and prev.selected is not None:
            overlap = f"{overlap_matrix([prev.selected, sel])[0, 1]:.2f}"
            moved = f"{len(set(sel) - set(prev.selected)):,} / {len(set(prev.selected) - set(sel)):,}"
        losses = [r.get("loss") for r in it.metrics or () if isinstance(r.get("loss"), (int, float))]
        steps = len(it.metrics) if it.metrics else run.result(stage_name(it.e, "train")).get("steps")
        rows.append(
            [
                str(it.e),
                _fmt(scored),
                _fmt(cands),
                _fmt(len(sel) if sel is not None else res.get("k")),
                *means,
                overlap,
                moved,
                _fmt(steps),
                _fmt(_mean(losses), ".4f"),
            ]
        )
        prev = it
    return rows


def _missing(run: Run) -> list[str]:
    """Planned stages that have not finished (not started, running, failed), and unreadable files."""
    with_proxy = (run.config.get("scoring") or {}).get("proxy_model")
    proxy = [stage_name(0, k) for k in PROXY_STAGES] if with_proxy else []
    names = ["ingest"] + proxy + [stage_name(e, k) for e in range(run.planned) for k in ITERATION_STAGES]
    out = []
    # The report stage is this page being written: its own "running" is not something missing.
    for name in names + [s for s in run.manifest.get("stages", {}) if s not in names and s != "report"]:
        st = run.stage(name)
        if not st:
            out.append(f"{name}: not started")
        elif st.get("status") == "running":
            out.append(f"{name}: running since {st.get('started', '?')} (no result yet)")
        elif st.get("status") == "failed":
            out.append(f"{name}: failed: {st.get('error', 'no error message recorded')}")
        elif st.get("status") != "done":
            out.append(f"{name}: status {st.get('status')!r}")
    return out + run.notes


# --------------------------------------------------------------------------------------------
# Plots: each returns a Figure, or a sentence saying why there is nothing to draw yet


def _figure(width: float, height: float, panels: int = 1):
    """A figure and its axes: `panels` in rows of three, unused cells hidden."""
    from matplotlib.figure import Figure  # heavy, and only the report needs it; Figure keeps no pyplot state

    cols, rows = min(panels, 3) or 1, math.ceil(panels / 3) or 1
    fig = Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")
    if not panels:  # the caller lays out its own axes
        return fig, []
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _hbars(ax, labels, values, colors, notes, log=False):
    """Horizontal bars top to bottom, each with its number written at its end."""
    ax.barh(range(len(labels)), values, color=colors, log=log)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    for y, (v, note) in enumerate(zip(values, notes)):
        ax.annotate(note, (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
    ax.margins(x=0.15)


def plot_rows(run: Run):
    bars = []  # (label, count, color), top to bottom
    if "read" in run.ingest:
        bars += [
            ("read", run.ingest["read"], "tab:gray"),
            ("accepted", run.ingest.get("accepted", 0), "tab:green"),
        ]
        bars += [
            (f"ingest reject: {r}", n, "tab:red")
            for r, n in (run.ingest.get("rejected_by_reason") or {}).items()
        ]
    for it in run.iters:
        s = it.summary or {}
        if "scored" in s:
            what = (
                "scored"
                if it.e == 0
                else "window (iter 0 scores kept)"
                if s.get("reused_from")
                else "re-scored (window)"
            )
            bars.append((f"iter {it.e} {what}", s["scored"], "tab:blue"))
        bars += [
            (f"iter {it.e} scoring reject: {r}", n, "tab:orange")
            for r, n in (s.get("rejected_by_reason") or {}).items()
        ]
    if not bars:
        return "no ingest or scoring summary yet"
    fig, (ax,) = _figure(9, 1.4 + 0.32 * len(bars))
    labels, counts, colors = zip(*bars)
    positive = [n for n in counts if n > 0]
    log = max(positive, default=1) > 100 * min(positive, default=1)  # a few rejects beside a million rows
    _hbars(ax, labels, counts, colors, [f"{n:,}" for n in counts], log=log)
    ax.set_xlabel("rows" + (" (log scale)" if log else ""))
    ax.set_title("Rows read, accepted and rejected (by reason) at ingest and scoring")
    return fig


def plot_ifd_distribution(run: Run):
    # A window whose scores were kept from iteration 0 (random, longest) would only repeat iteration 0's.
    series = [
        (it.e, it.ifd[np.isfinite(it.ifd)])
        for it in run.iters
        if it.ifd is not None and len(it.ifd) and not (it.summary or {}).get("reused_from")
    ]
    if not series or not sum(len(x) for _, x in series):
        return "no scores yet"
    lo, hi = np.quantile(np.concatenate([x for _, x in series]), [0.005, 0.995])
    bins = np.linspace(min(lo, 0.95), max(hi, 1.05), 60)  # always show the cut-off at 1
    fig, (ax,) = _figure(8, 4.5)
    for e, x in series:
        # Density, not counts: iteration 0 scores all N samples, later ones only the window W.
        ax.hist(
            np.clip(x, bins[0], bins[-1]),
            bins=bins,
            histtype="step",
            linewidth=1.6,
            density=True,
            label=f"iteration {e}: {'all scored' if e == 0 else 're-scored window'} ({len(x):,})",
        )
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="IFD = 1: candidates lie to the left")
    ax.set_xlabel("IFD (values beyond the 0.5-99.5 percentiles drawn in the edge bins)")
    ax.set_ylabel("density")
    ax.set_title("IFD distribution per iteration")
    ax.legend(fontsize=9)
    return fig


def plot_selected_vs_rest(run: Run):
    its = [it for it in run.iters if it.ids is not None and it.selected and np.isfinite(it.ifd).any()]
    if not its:
        return "no iteration has both scores and a selection yet"
    fig, axes = _figure(4.4, 3.8, len(its))
    for ax, it in zip(axes, its):
        m, fin = _selected_mask(it), np.isfinite(it.ifd)
        sel, rest = it.ifd[m & fin], it.ifd[~m & fin]
        bins = np.linspace(min(it.ifd[fin].min(), 0.95), max(it.ifd[fin].max(), 1.05), 40)
        if len(rest):
            ax.hist(
                rest,
                bins=bins,
                density=True,
                color="tab:gray",
                alpha=0.5,
                label=f"rest: {len(rest):,}, mean {rest.mean():.3f}",
            )
        if len(sel):
            ax.hist(
                sel,
                bins=bins,
                density=True,
                histtype="step",
                color="tab:red",
                linewidth=1.8,
                label=f"selected: {len(sel):,}, mean {sel.mean():.3f}",
            )
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set(title=f"iteration {it.e}", xlabel="IFD", ylabel="density")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("IFD of the selected samples vs the rest of each iteration's scored samples")
    return fig


def plot_overlap(run: Run):
    its = [it for it in run.iters if it.selected is not None]
    if len(its) < 2:
        return "needs the selections of two iterations"
    m = overlap_matrix([it.selected for it in its])
    fig, (ax,) = _figure(1.6 + 1.1 * len(its), 1.2 + 1.0 * len(its))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(m):  # dark cells (low overlap) get white numbers
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    names = [f"iter {it.e}" for it in its]
    ax.set_xticks(range(len(its)), names)
    ax.set_yticks(range(len(its)), names)
    ax.set(xlabel="selection j", ylabel="selection i", title="Overlap between iterations' selections")
    fig.colorbar(im, ax=ax, label=r"$|S_i \cap S_j|\ /\ k$")
    return fig


def plot_rescoring_moves(run: Run):
    pairs = [(a, b) for a, b in zip(run.iters, run.iters[1:]) if b.ids is not None and a.order and b.order]
    if not pairs:
        return "needs an iteration after the first with scores and both orders"
    rng = np.random.default_rng(0)  # the same points on every report
    groups = [
        ("stayed selected", True, True, "tab:red"),
        ("entered the selection", False, True, "tab:green"),
        ("left the selection", True, False, "tab:purple"),
        ("not selected", False, False, "tab:gray"),
    ]
    fig, axes = _figure(5.2, 5.0, len(pairs))
    for ax, (a, b) in zip(axes, pairs):
        old, new = _positions(a.order, b.ids), _positions(b.order, b.ids)
        was, now = set(a.selected or ()), set(b.selected or ())
        keep = np.flatnonzero((old >= 0) & (new >= 0))  # re-scored ids found in both orders
        if len(keep) > MAX_POINTS:
            keep = np.sort(rng.choice(keep, MAX_POINTS, replace=False))
        in_was = np.array([b.ids[i] in was for i in keep], bool)
        in_now = np.array([b.ids[i] in now for i in keep], bool)
        for label, w, n, color in groups:
            g = keep[(in_was == w) & (in_now == n)]
            if len(g):
                ax.scatter(
                    old[g],
                    new[g],
                    s=8 if len(keep) < 2000 else 2,
                    color=color,
                    alpha=0.7,
                    linewidths=0,
                    label=f"{label} ({len(g):,})",
                )
        top = max(old[keep].max(), new[keep].max()) if len(keep) else 1
        ax.plot([0, top], [0, top], color="black", linestyle="--", linewidth=0.8, label="unchanged position")
        ax.set(xlabel=f"position in iteration {a.e}'s order", ylabel=f"position in iteration {b.e}'s order")
        ax.set_title(
            f"iter {a.e} -> {b.e}: {len(now - was):,} entered, {len(was - now):,} left the selection",
            fontsize=10,
        )
        # Below the axes: every corner of this scatter can hold the points that matter.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle("How re-scoring moved the samples of each window")
    return fig


def proxy_agreement(run: Run) -> tuple[np.ndarray, np.ndarray, float] | None:
    """With a proxy: (proxy IFD, base-model IFD, Spearman's rho) over iteration 0's window, the rows
    both models scored; None without a proxy or before the window is scored."""
    it = run.iters[0] if run.iters else None
    if not run.proxy or it is None or it.ids is None:
        return None
    proxy_ifd = dict(zip(run.proxy["id"].tolist(), run.proxy["ifd"].tolist()))
    pairs = [(proxy_ifd[i], b) for i, b in zip(it.ids.tolist(), it.ifd.tolist()) if i in proxy_ifd]
    pairs = np.array([p for p in pairs if np.isfinite(p).all()], dtype=np.float64).reshape(-1, 2)
    if len(pairs) < 3:
        return pairs[:, 0], pairs[:, 1], float("nan")
    from scipy.stats import spearmanr

    return pairs[:, 0], pairs[:, 1], float(spearmanr(pairs[:, 0], pairs[:, 1]).statistic)


def plot_proxy_agreement(run: Run):
    if not (run.config.get("scoring") or {}).get("proxy_model"):
        return None  # not a proxy run: nothing to say
    found = proxy_agreement(run)
    if found is None or not len(found[0]):
        return "needs the proxy's scores and iteration 0's re-scored window"
    proxy_ifd, base_ifd, rho = found
    fig, (ax,) = _figure(5.2, 5.0)
    ax.scatter(proxy_ifd, base_ifd, s=8 if len(base_ifd) < 2000 else 2, alpha=0.6, linewidths=0)
    lo, hi = float(min(proxy_ifd.min(), base_ifd.min())), float(max(proxy_ifd.max(), base_ifd.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", linewidth=0.8, label="equal IFD")
    ax.set(
        xlabel=f"IFD under the proxy ({run.config['scoring']['proxy_model']})",
        ylabel="IFD under the base model",
    )
    ax.set_title(f"iteration 0's window: {len(base_ifd):,} samples, Spearman {rho:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_training(run: Run):
    rows = sorted(
        (r["step"], r["loss"], r.get("lr", np.nan), it.e)
        for it in run.iters
        for r in it.metrics or ()
        if all(isinstance(r.get(k), (int, float)) for k in ("step", "loss"))
    )
    if not rows:
        return "no training step logged yet"
    step, loss, lr, e = (np.array(c, dtype=np.float64) for c in zip(*rows))
    fig, _ = _figure(9, 6, 0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    few = len(step) <= 50  # few steps: mark each (a single step is otherwise an invisible line)
    ax1.plot(
        step,
        loss,
        color="tab:blue",
        linewidth=0.8 if not few else 1.2,
        alpha=1 if few else 0.45,
        marker="o" if few else None,
        markersize=3,
        label="per step",
    )
    w = max(5, len(step) // 50)
    if len(step) >= 2 * w:  # a running mean shows the trend through the per-step noise
        ax1.plot(
            step[w - 1 :],
            np.convolve(loss, np.ones(w) / w, "valid"),
            color="tab:blue",
            linewidth=1.8,
            label=f"mean of {w} steps",
        )
    ax2.plot(step, lr, color="tab:orange", marker="o" if few else None, markersize=3)
    for i in np.unique(e):
        first = step[e == i].min()
        if i > 0:
            for ax in (ax1, ax2):
                ax.axvline(first, color="gray", linestyle=":", linewidth=1)
        ax1.text(first, 0.97, f" iter {int(i)}", transform=ax1.get_xaxis_transform(), va="top", fontsize=9)
    ax1.set(ylabel="training loss", title="Training loss and learning rate over all iterations")
    ax1.legend(fontsize=9, loc="best")
    ax2.set(ylabel="learning rate", xlabel="global optimizer step (dotted lines: iteration starts)")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def plot_stage_timings(run: Run):
    stages = list(run.manifest.get("stages", {}).items())
    if not stages:
        return "no stage has started"
    fig, (ax,) = _figure(9, 1.4 + 0.32 * len(stages))
    secs = [_seconds(st) for _, st in stages]
    status = [st.get("status") for _, st in stages]
    notes = [
        ("no time yet" if s is None else f"{s:,.1f} s") + ("" if x == "done" else f" ({x})")
        for s, x in zip(secs, status)
    ]
    kinds = [name.rsplit("/", 1)[-1] for name, _ in stages]
    _hbars(
        ax,
        [name for name, _ in stages],
        [s or 0.0 for s in secs],
        [KIND_COLORS.get(k, "tab:brown") for k in kinds],
        notes,
    )
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=KIND_COLORS.get(k, "tab:brown"), label=k) for k in dict.fromkeys(kinds)],
        fontsize=9,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )  # outside: long bars reach any corner
    ax.set(xlabel="wall seconds", title="Time per stage")
    return fig


PLOTS = [  # (file, caption, drawing function), in the order the page shows them
    ("rows.png", "Rows read, accepted and rejected", plot_rows),
    ("ifd.png", "IFD distribution per iteration", plot_ifd_distribution),
    ("selected_vs_rest.png", "IFD of selected samples vs the rest", plot_selected_vs_rest),
    ("overlap.png", "Overlap between selections", plot_overlap),
    ("rescoring.png", "How re-scoring moved samples", plot_rescoring_moves),
    ("proxy.png", "Proxy IFD against the base model's on iteration 0's window", plot_proxy_agreement),
    ("training.png", "Training loss and learning rate", plot_training),
    ("timings.png", "Time per stage", plot_stage_timings),
]


# --------------------------------------------------------------------------------------------
# The page: a list of blocks ("h", level, text) | ("p", text) | ("ul", items) | ("table", header, rows)
# | ("img", caption, file), written out once as Markdown and once as HTML


def _throughput(name: str, st: dict) -> str:
    r, kind, s = st.get("result") or {}, name.rsplit("/", 1)[-1], _seconds(st)
    if kind == "ingest" and "read" in r and s:
        return f"{r['read'] / s:,.0f} rows/s"
    if kind == "score" and "tokens_per_s" in r:
        return (
            f"{r['tokens_per_s']:,.0f} tokens/s, {r.get('samples_per_s', 0):,.1f} samples/s, "
            f"padding {r.get('padding_fraction', 0):.1%}"
        )
    if kind == "select" and "k" in r:
        return f"k = {r['k']:,} of {_fmt(r.get('candidates'))} candidates"
    if kind == "train" and "tokens_per_s" in r:
        return (
            f"{r['tokens_per_s']:,.0f} tokens/s, {_fmt(r.get('steps'))} steps, "
            f"final loss {_fmt(r.get('final_loss'), '.4f')}"
        )
    return ""


def _when(s) -> datetime | None:
    try:
        return datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    except ValueError:
        return None


def _summary_rows(run: Run) -> list[list[str]]:
    sel, ing, stages = run.config.get("selection") or {}, run.ingest, run.manifest.get("stages", {})
    done = sum(run.stage(stage_name(e, "train")).get("status") == "done" for e in range(run.planned))
    first = run.iters[0] if run.iters else None
    n = ing.get("accepted", len(first.order["id"]) if first and first.order else None)
    ks = ", ".join(_fmt(len(it.selected)) for it in run.iters if it.selected is not None) or "-"
    windows = (
        ", ".join(
            _fmt((it.summary or {}).get("rows", len(it.ids) if it.ids is not None else None))
            for it in run.iters[1:]
            if it.summary or it.ids is not None
        )
        or "-"
    )
    starts = [t for st in stages.values() if (t := _when(st.get("started")))]
    ends = [t for st in stages.values() if (t := _when(st.get("finished")))]
    span = (
        f"; first start to last finish {(max(ends) - min(starts)).total_seconds():,.0f} s"
        if starts and ends
        else ""
    )
    return [
        ["run directory", run.path],
        ["base model", str(run.config.get("base_model", "-"))],
        ["created, seed", f"{run.manifest.get('created', '-')}, seed {run.manifest.get('seed', '-')}"],
        [
            "corpus rows",
            f"{_fmt(ing.get('read'))} read, {_fmt(ing.get('accepted'))} accepted, "
            f"{_fmt(ing.get('rejected'))} rejected",
        ],
        ["samples N", _fmt(n)],
        ["k per iteration", ks + (f" (ratio {sel['ratio']})" if "ratio" in sel else "")],
        [
            "window W, re-scored after iteration 0",
            windows + (f" (k x update_ratio {sel['update_ratio']})" if "update_ratio" in sel else ""),
        ],
        ["selection method, decay", f"{sel.get('method', '-')}, decay {sel.get('decay', '-')}"],
        ["iterations done / planned", f"{done} / {run.planned}"],
        ["total wall time", f"{sum(_seconds(st) or 0.0 for st in stages.values()):,.1f} s in stages{span}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in (run.manifest.get("versions") or {}).items()) or "-"],
    ]


def _blocks(run: Run, plots: list[tuple[str, str]], skipped: list[str]) -> list[tuple]:
    missing = _missing(run)
    counts = [("ingest", run.ingest.get("rejected_by_reason") or {})]
    proxy_scoring = run.result(stage_name(0, "proxy_score"))
    if proxy_scoring:
        counts.append(("iter 0 proxy scoring", proxy_scoring.get("rejected_by_reason") or {}))
    counts += [
        (f"iter {it.e} scoring", it.summary.get("rejected_by_reason") or {}) for it in run.iters if it.summary
    ]
    reasons = list(dict.fromkeys(r for _, c in counts for r in c))
    rejects = [
        [r, *(_fmt(c.get(r, 0)) for _, c in counts), _fmt(sum(c.get(r, 0) for _, c in counts))]
        for r in reasons
    ]
    iterations = _iteration_rows(run)
    stages = [
        [
            name,
            # the report stage is this page being written: "running" in the manifest until it is saved
            "done (this page)"
            if name == "report" and st.get("status") == "running"
            else st.get("status", "-"),
            st.get("started", "-"),
            _fmt(_seconds(st), ",.1f"),
            _throughput(name, st),
        ]
        for name, st in run.manifest.get("stages", {}).items()
    ]
    return [
        ("h", 1, "iterit run report"),
        ("p", f"Run {run.path}: " + ("incomplete, see What is missing." if missing else "complete.")),
        ("h", 2, "Run summary"),
        ("table", ["", "value"], _summary_rows(run)),
        ("h", 2, "What is missing"),
        ("ul", missing)
        if missing
        else ("p", f"Nothing: all {run.planned} planned iterations ran every stage."),
        ("h", 2, "Stages"),
        ("table", ["stage", "status", "started", "seconds", "throughput"], stages),
        ("h", 2, "Iterations"),
        (
            "p",
            "Scored: samples scored in the iteration (all of N in iteration 0, the window W later). "
            "Mean IFD of the selected samples vs the rest of that iteration's scored samples. "
            "Overlap: |S_e & S_e-1| / k. Entered / left: samples that joined / dropped out of the previous "
            "iteration's selection.",
        ),
        (
            "table",
            [
                "iteration",
                "scored",
                "candidates",
                "k",
                "mean IFD selected",
                "mean IFD rest",
                "overlap with previous",
                "entered / left",
                "train steps",
                "train mean loss",
            ],
            iterations,
        )
        if iterations
        else ("p", "No iteration has started."),
        *((("p", _proxy_line(run, proxy_scoring)),) if proxy_scoring else ()),
        ("h", 2, "Rejected rows"),
        ("table", ["reason", *(name for name, _ in counts), "total"], rejects) if rejects else ("p", "None."),
        ("h", 2, "Plots"),
        *(("img", caption, name) for caption, name in plots),
        *((("p", "Not drawn:"), ("ul", skipped)) if skipped else ()),
    ]


def _proxy_line(run: Run, proxy_scoring: dict) -> str:
    """What the proxy did in iteration 0, and how well its IFD ranked the window like the base model's."""
    found = proxy_agreement(run)
    rho = f"{found[2]:.3f} over {len(found[0]):,} samples" if found and len(found[0]) else "not yet known"
    window = run.iters[0].summary.get("rows") if run.iters and run.iters[0].summary else None
    return (
        f"Iteration 0 scored with the proxy {run.config['scoring']['proxy_model']}: it scored "
        f"{_fmt(proxy_scoring.get('scored'))} of {_fmt(proxy_scoring.get('rows'))} samples, and the base "
        f"model re-scored the first {_fmt(window)} of its order (the window). Spearman of the two IFDs "
        f"on the window: {rho}."
    )


def to_markdown(blocks: list[tuple]) -> str:
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = []
    for kind, *a in blocks:
        if kind == "h":
            out.append("#" * a[0] + " " + a[1])
        elif kind == "p":
            out.append(a[0])
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in a[0]))
        elif kind == "table":
            out.append("\n".join([row(a[0]), "|" + "---|" * len(a[0]), *map(row, a[1])]))
        elif kind == "img":
            out += [f"### {a[0]}", f"![{a[0]}]({a[1]})"]
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple]) -> str:
    e, out = lambda x: html.escape(str(x)), []
    for kind, *a in blocks:
        if kind == "h":
            out.append(f"<h{a[0]}>{e(a[1])}</h{a[0]}>")
        elif kind == "p":
            out.append(f"<p>{e(a[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in a[0]) + "</ul>")
        elif kind == "table":
            rows = [a[0], *a[1]]
            out.append(
                "<table>"
                + "".join(
                    "<tr>" + "".join(f"<{t}>{e(x)}</{t}>" for x in r) + "</tr>"
                    for t, r in zip(["th"] + ["td"] * len(a[1]), rows)
                )
                + "</table>"
            )
        elif kind == "img":
            out.append(f'<h3>{e(a[0])}</h3>\n<img src="{e(a[1])}" alt="{e(a[0])}">')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>iterit run report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def write_report(run_dir: str) -> dict:
    """Write RUN/report/report.md, report.html and the PNG plots. Returns {report, html, plots: [paths]}."""
    run, out = load_run(run_dir), RunDir(run_dir).report
    try:
        import matplotlib.figure  # noqa: F401

        plots, skipped = PLOTS, []
    except ImportError:
        plots, skipped = [], ["every plot: matplotlib is not installed (pip install matplotlib)"]
    drawn = []
    for name, caption, draw in plots:
        try:
            fig = draw(run)
            if fig is None:  # a plot of a feature this run does not use (a proxy's)
                continue
            if isinstance(fig, str):
                skipped.append(f"{caption}: {fig}")
                continue
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
        except Exception as e:  # one odd value must not cost the whole report; the page says what failed
            skipped.append(f"{caption}: could not draw: {type(e).__name__}: {e}")
            continue
        with atomic_open(join(out, name), "wb") as f:
            f.write(buf.getvalue())
        drawn.append((caption, name))
    blocks = _blocks(run, drawn, skipped)
    md, page = join(out, "report.md"), join(out, "report.html")
    atomic_write_text(md, to_markdown(blocks))
    atomic_write_text(page, to_html(blocks))
    return {"report": md, "html": page, "plots": [join(out, name) for _, name in drawn]}
