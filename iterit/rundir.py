"""The run directory (docs/architecture.md section 3): every path of a run, its manifest, and the one
reader and writer of a selection. Nothing else builds a run's paths or stage names.

    RUN/config.yaml                 the resolved config (what --resume goes on with)
    RUN/manifest.json               stage -> status, timings, result; seed, versions
    RUN/ingest/                     samples.parquet, rejects.jsonl, summary.json (data.ingest)
    RUN/iter_<e>/                   scores.parquet, rejects.jsonl, score_summary.json (scoring),
                                    selection.jsonl, order.parquet (selection), train_metrics.jsonl
    RUN/iter_0/proxy/               with scoring.proxy_model: the proxy's scores of all N and its
                                    order (the same files as a scoring and a selection); iter_0/'s
                                    own scores are then the base model's re-scoring of the window
    RUN/eval/iter_<e>.json          held-out evaluation of RUN/model/iter_<e> (iterit compare), with
    RUN/eval/iter_<e>/              its scores and rejects (base.json, base/: the base model's)
    RUN/checkpoints/                Ray Train's storage: resumable DeepSpeed state (unless storage_path)
    RUN/model/iter_<e>/             HF weights, tokenizer and chat template of iteration e
    RUN/report/                     report.md, report.html, PNG plots
    RUN/tensorboard/                event files (report_to: tensorboard)
    RUN/corpus/                     the corpus `iterit demo` built for its run

Stages are named `ingest`, `iter_<e>/score`, `iter_<e>/select`, `iter_<e>/train` and `report` (with a
proxy, `iter_0/proxy_score` and `iter_0/proxy_select` come first); Ray Train's dataset of iteration e is
named `iter_<e>` too (`iteration_key`).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iterit.errors import IteritError
from iterit.io import atomic_open, atomic_write_text, filesystem, join, read_jsonl, read_parquet

MANIFEST_FORMAT = 1
ITERATION_STAGES = ("score", "select", "train")
PROXY_STAGES = ("proxy_score", "proxy_select")  # iteration 0's first two stages with a proxy model
ORDER_SCHEMA = pa.schema(
    [("id", pa.string()), ("position", pa.int64()), ("ifd", pa.float64()), ("status", pa.string())]
)


def iteration_key(e: int) -> str:
    """`iter_<e>`: the folder of iteration e, the prefix of its stages, its Ray Train dataset name."""
    return f"iter_{e}"


def stage_name(e: int, kind: str) -> str:
    """The manifest key of iteration e's `kind` stage (score, select or train)."""
    if kind not in ITERATION_STAGES + PROXY_STAGES:
        raise ValueError(
            f"unknown iteration stage {kind!r}; expected one of {ITERATION_STAGES + PROXY_STAGES}"
        )
    return f"{iteration_key(e)}/{kind}"


# --------------------------------------------------------------------------------------------
# What one stage writes into its folder: an iteration's, or the --output of `iterit score/select`


@dataclass(frozen=True)
class ScoreFiles:
    """The scoring stage's outputs in `dir`.

    scores/             Parquet parts written by the cluster, one per block: every row of the stage with
                        its `reject` reason ("" when scored) and `detail`; each id in exactly one part
                        (runs made before hold one scores.parquet instead, scored rows only)
    scores.checkpoint/  Ray Data's id checkpoint while the stage runs; gone once it has finished
    rejects.jsonl, score_summary.json   built from the parts when the write is done
    """

    dir: str

    @property
    def scores(self) -> str:
        return join(self.dir, "scores")

    @property
    def legacy_scores(self) -> str:
        return join(self.dir, "scores.parquet")

    @property
    def checkpoint(self) -> str:
        return join(self.dir, "scores.checkpoint")

    @property
    def rejects(self) -> str:
        return join(self.dir, "rejects.jsonl")

    @property
    def summary(self) -> str:
        return join(self.dir, "score_summary.json")

    @property
    def written(self) -> str:
        """The scores as they are on disk: the parts folder, or an older run's single file."""
        fs, p = filesystem(self.legacy_scores)
        return self.legacy_scores if fs.exists(p) and not score_parts(self.scores) else self.scores

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The scored rows (rejects left out), only `columns` (all when None)."""
        return read_scores(self.written, columns)

    def damage(self) -> str | None:
        """The first scores part that cannot be trusted (one line naming it), or None."""
        return next(filter(None, map(part_damage, score_parts(self.scores))), None)


def score_parts(path: str) -> list[str]:
    """The Parquet parts of a scores folder (URIs as given), sorted; [] when there is none."""
    fs, p = filesystem(path)
    if not fs.isdir(p):
        return []
    found = sorted(f for f in fs.find(p) if f.endswith(".parquet"))
    return [fs.unstrip_protocol(f) for f in found] if "://" in path else found


def part_damage(part: str) -> str | None:
    """Why a Parquet file (a scores part, an order) cannot be trusted (one line naming it), or None:
    its footer must read and hold the row count of its row groups. A part cut short by a node lost
    mid-write, or damaged on disk later, fails here; one that reads is whole (the footer is written
    last)."""
    return _footer(part)[1]


def _footer(path: str) -> tuple[int | None, str | None]:
    """(rows, None) of a Parquet file whose footer reads and adds up, else (None, why it is damaged)."""
    fs, p = filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as e:  # pyarrow's ArrowInvalid, an OSError of the filesystem, ...
        return None, f"{path}: damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if meta.num_rows != sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups)):
        return None, f"{path}: damaged (its row groups do not add up to its row count)"
    return meta.num_rows, None


def iter_scores(path: str, columns: list[str] | None = None, scored_only: bool = True):
    """Tables of a scores folder (part by part, so memory stays that of one part) or of a single scores
    file: `columns` only, and only scored rows unless scored_only is False."""
    parts = score_parts(path)
    if not parts:
        fs, p = filesystem(path)
        parts = [path] if fs.isfile(p) else []
    for part in parts:
        fs, p = filesystem(part)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            want = None if columns is None else [c for c in columns if c in names]
            has_reject = "reject" in names
            read = want if want is None or not (scored_only and has_reject) else sorted({*want, "reject"})
            table = pf.read(columns=read)
        if scored_only and has_reject:
            table = table.filter(pc.equal(table.column("reject"), "")).select(want or table.column_names)
        yield table


def read_scores(path: str, columns: list[str] | None = None) -> pa.Table:
    """The scored rows of a scores folder or file as one table (`columns` only)."""
    from iterit.errors import IteritError

    tables = list(iter_scores(path, columns))
    if not tables:
        raise IteritError(f"scores not found: {path}")
    return pa.concat_tables(tables, promote_options="permissive")


def id_array(ids) -> pa.Array:
    """Sample ids as one Arrow string array (how the driver holds them at 10^7 samples): a list is
    converted, an Arrow array passes as it is."""
    return pa.array(ids, pa.string()) if isinstance(ids, list) else ids


@dataclass(frozen=True)
class SelectionFiles:
    """The selection stage's outputs in `dir`: the picks (selection.jsonl) and the order (order.parquet)."""

    dir: str

    @property
    def selection(self) -> str:
        return join(self.dir, "selection.jsonl")

    @property
    def order(self) -> str:
        return join(self.dir, "order.parquet")

    @property
    def tfidf(self) -> str:
        """The hashed TF-IDF rows built on the cluster for the greedy (selection.shards); removed once
        the selection is written."""
        return join(self.dir, "tfidf")

    def write(self, order, ifd: np.ndarray, status: list[str], gains: list[float]) -> None:
        """The picks are order[: len(gains)] (in pick order); `order` an Arrow string array or a list of
        ids; `ifd` and `status` are aligned with it (NaN and "tail" past the re-ordered window)."""
        ifd = np.asarray(ifd, dtype=np.float64)
        order = id_array(order)
        with atomic_open(self.selection, "w") as f:
            for rank, (sid, gain) in enumerate(zip(order.slice(0, len(gains)).to_pylist(), gains)):
                f.write(json.dumps({"id": sid, "rank": rank, "ifd": float(ifd[rank]), "gain": gain}) + "\n")
        table = pa.table(
            {"id": order, "position": np.arange(len(order), dtype=np.int64), "ifd": ifd, "status": status},
            schema=ORDER_SCHEMA,
        )
        with atomic_open(self.order) as f:
            pq.write_table(table, f)

    def damage(self, k: int, n: int) -> str | None:
        """Why these files cannot be trusted as a selection of k picks in an order of n ids (one line
        naming the file), or None: selection.jsonl parses into ranks 0..k-1, order.parquet reads with n
        rows. Both are written atomically, so damage means a disk or a hand went wrong afterwards."""
        try:
            ranks = [r["rank"] for r in read_jsonl(self.selection, missing_ok=False)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{self.selection} does not read ({type(e).__name__}: {str(e)[:120]})"
        if ranks != list(range(k)):
            return f"{self.selection} holds {len(ranks):,} picks in ranks other than 0..{k - 1}"
        rows, problem = _footer(self.order)
        if problem:
            return problem
        return None if rows == n else f"{self.order} holds {rows:,} ids, not the {n:,} of the order"

    def read_selection(self, missing_ok: bool = True) -> list[dict]:
        return read_jsonl(self.selection, missing_ok=missing_ok)

    def read_picks(self) -> list[str]:
        return [r["id"] for r in read_jsonl(self.selection, missing_ok=False)]

    def read_order(self) -> list[str]:
        return self.order_ids().to_pylist()

    def order_ids(self) -> pa.Array:
        """The order's ids as one Arrow string array (what the loop holds at 10^7 samples)."""
        return pc.cast(read_parquet(self.order, columns=["id"]).column("id"), pa.string()).combine_chunks()


# --------------------------------------------------------------------------------------------
# The run directory


def _eval_name(e: int | None) -> str:
    return "base" if e is None else iteration_key(e)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run (local or an fsspec URI). Frozen and small: it travels into Ray workers."""

    path: str

    @property
    def config(self) -> str:
        return join(self.path, "config.yaml")

    @property
    def manifest(self) -> str:
        return join(self.path, "manifest.json")

    @property
    def lock(self) -> str:
        """The driver that holds the run (iterit.runlock)."""
        return join(self.path, "lock.json")

    @property
    def ingest(self) -> str:
        return join(self.path, "ingest")

    @property
    def ingest_summary(self) -> str:
        return join(self.ingest, "summary.json")

    @property
    def checkpoints(self) -> str:
        return join(self.path, "checkpoints")

    @property
    def report(self) -> str:
        return join(self.path, "report")

    @property
    def tensorboard(self) -> str:
        return join(self.path, "tensorboard")

    @property
    def corpus(self) -> str:
        """The corpus `iterit demo` builds for its run (demo_corpus.jsonl, tokens.json)."""
        return join(self.path, "corpus")

    def iteration(self, e: int) -> str:
        return join(self.path, iteration_key(e))

    def scoring(self, e: int) -> ScoreFiles:
        return ScoreFiles(self.iteration(e))

    def selection(self, e: int) -> SelectionFiles:
        return SelectionFiles(self.iteration(e))

    def proxy(self) -> str:
        """Iteration 0's proxy folder: the proxy model's scores of every sample and its order."""
        return join(self.iteration(0), "proxy")

    def proxy_scoring(self) -> ScoreFiles:
        return ScoreFiles(self.proxy())

    def proxy_selection(self) -> SelectionFiles:
        return SelectionFiles(self.proxy())

    def train_metrics(self, e: int) -> str:
        return join(self.iteration(e), "train_metrics.jsonl")

    def model(self, e: int) -> str:
        return join(self.path, "model", iteration_key(e))

    def eval_json(self, e: int | None) -> str:
        """Held-out evaluation of iteration e's model (e = None: the base model)."""
        return join(self.path, "eval", f"{_eval_name(e)}.json")

    def eval_dir(self, e: int | None) -> str:
        """That evaluation's ingest, scores and rejects."""
        return join(self.path, "eval", _eval_name(e))

    def iterations_on_disk(self) -> list[int]:
        """The e of every RUN/iter_<e> folder, sorted."""
        fs, root = filesystem(self.path)
        found = (
            re.fullmatch(r"iter_(\d+)", d.rstrip("/").rsplit("/", 1)[-1])
            for d in fs.glob(f"{root.rstrip('/')}/iter_*")
        )
        return sorted(int(m.group(1)) for m in found if m)

    def exists(self) -> bool:
        fs, p = filesystem(self.manifest)
        return fs.exists(p)


# --------------------------------------------------------------------------------------------
# The manifest


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("iterit", "torch", "ray", "transformers", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def done_record(result: dict, **extra) -> dict:
    """The manifest record of a stage done elsewhere, at no cost here (a compare's shared stages)."""
    return {
        "status": "done",
        "started": _now(),
        "finished": _now(),
        "seconds": 0.0,
        "result": result,
        **extra,
    }


class Manifest:
    """RUN/manifest.json: stage name -> {status, started, finished, seconds, result | error}."""

    def __init__(self, run: RunDir, data: dict):
        self.run_dir, self.data = run, data
        self.guard = None  # called before each save: the run lock's check, so a driver taken over stops

    @classmethod
    def create(
        cls, run: RunDir, seed: int | None = None, iterations: int | None = None, stages: dict | None = None
    ) -> Manifest:
        """A new manifest, saved: a run's (seed, iterations), or that of the shared stages of a compare.
        `stages`: records of stages done elsewhere (done_record), written in the same save."""
        data = {"format": MANIFEST_FORMAT, "run_dir": run.path, "created": _now(), "versions": _versions()}
        if seed is not None:
            data["seed"] = seed
        if iterations is not None:
            data["iterations"] = iterations
        manifest = cls(run, {**data, "stages": dict(stages or {})})
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run: RunDir) -> Manifest:
        fs, p = filesystem(run.manifest)
        if not fs.exists(p):
            raise IteritError(
                f"{run.path}: not an iterit run directory (no manifest.json); "
                "start one with `iterit run CONFIG`"
            )
        with fs.open(p, "r") as f:
            return cls(run, json.load(f))

    @classmethod
    def open(cls, run: RunDir, **create) -> Manifest:
        """The run's manifest, created (with `create`'s seed and iterations) when there is none yet."""
        return cls.load(run) if run.exists() else cls.create(run, **create)

    def save(self) -> None:
        if self.guard is not None:
            self.guard()
        atomic_write_text(self.run_dir.manifest, json.dumps(self.data, indent=2) + "\n")

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def done(self, name: str) -> dict | None:
        rec = self.stages.get(name)
        return rec["result"] if rec and rec["status"] == "done" else None

    def run(self, name: str, fn, log=print, check=None) -> dict:
        """Run stage `name` unless it is done; record status, timing and result (or the error).
        `check(result)`: why a done stage's files cannot be trusted (None when they can); such a stage
        is named in one line and run again."""
        if (result := self.done(name)) is not None:
            if check is None or (problem := check(result)) is None:
                log(f"[{name}] done earlier, skipped")
                return result
            log(f"[{name}] done earlier, but {problem}: running it again")
        rec = {"status": "running", "started": _now()}
        self.stages[name] = rec
        self.save()
        t0 = time.perf_counter()
        try:
            result = fn()
        except BaseException as e:
            rec.update(
                status="failed",
                finished=_now(),
                seconds=round(time.perf_counter() - t0, 2),
                error=f"{type(e).__name__}: {e}",
            )
            self.save()
            raise
        rec.update(status="done", finished=_now(), seconds=round(time.perf_counter() - t0, 2), result=result)
        self.save()
        return result
