"""The picked samples as training files for other trainers (docs/export.md).

    picks (selection.jsonl of one iteration, of each, or their union)     k rows on the driver
    ray.data.read_parquet(samples)                                        every sample, on the cluster
      .map_batches(keep the picks, add rank/ifd/gain, convert)            k rows remain
      .sort(rank)                                                         pick order, on the cluster
      .write(OUTPUT)                                                      parts, or one file on request

The driver holds the picks' ids and scores (what the greedy held already), never the samples. The
conversions are plain functions of one conversation (`as_record`) so each format is tested without Ray.

Formats, each as its trainer documents it:
  messages  {"messages": [{"role", "content"}, ...]}: OpenAI's chat layout, which TRL's SFTTrainer and
            axolotl's `type: chat_template` read
  sharegpt  {"conversations": [{"from": "human"|"gpt", "value"}, ...], "system"}: LLaMA-Factory's
            sharegpt layout; its dataset_info.json entry is written beside the output
  alpaca    {"instruction", "input", "output", "system"}: single-turn rows only (a conversation with
            earlier turns is refused and counted: export it as messages or sharegpt)
  parquet   the samples' own columns (id, messages) with the pick columns
  hf        a `datasets.Dataset.save_to_disk` folder of the parquet columns
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iterit.errors import IteritError
from iterit.io import atomic_write_text, filesystem, join, read_jsonl
from iterit.rundir import RunDir, SelectionFiles, iteration_key

FORMATS = ("messages", "sharegpt", "alpaca", "parquet", "hf")
PICK_COLUMNS = ("rank", "ifd", "gain")  # left out with plain=True
SINGLE_FILE_SUFFIXES = {".jsonl": ("messages", "sharegpt", "alpaca"), ".parquet": ("parquet",)}
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
LLAMA_FACTORY_ENTRIES = {
    "sharegpt": {
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "system_tag": "system",
        },
    },
    "alpaca": {
        "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
    },
}


# --------------------------------------------------------------------------------------------
# One conversation in each format (pure)


def _split_system(messages: list[dict]) -> tuple[str, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return "", messages


def as_record(messages: list[dict], fmt: str) -> dict | None:
    """One normalised conversation (system turn first, response last) in `fmt`; None when the format
    cannot hold it (alpaca: a conversation with turns before the instruction)."""
    if fmt == "messages":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    system, turns = _split_system(messages)
    if fmt == "sharegpt":
        return {
            "conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in turns],
            "system": system,
        }
    if fmt == "alpaca":
        if [m["role"] for m in turns] != ["user", "assistant"]:
            return None
        # The whole user turn is the instruction: ingest joined an input in with "\nInput: ", and
        # splitting it back out could not be told apart from an instruction that contains those words.
        return {
            "instruction": turns[0]["content"],
            "input": "",
            "output": turns[1]["content"],
            "system": system,
        }
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# --------------------------------------------------------------------------------------------
# The picks


@dataclass(frozen=True)
class Source:
    """Where an export reads: the samples' Parquet file and the selection folder(s) by iteration."""

    samples: str
    selections: dict[int, SelectionFiles]  # iteration -> its selection (one entry for `iterit select`)


def find_source(run: str | None, selection: str | None, samples: str | None = None) -> Source:
    """A run directory (its iterations' selections) or an `iterit select --output` folder; `samples`: the
    samples' Parquet file of a selection folder that holds none (iterit.select writes only the picks)."""
    if (run is None) == (selection is None):
        raise IteritError(
            "give a run directory or --selection DIR (the --output of `iterit select`), not both"
        )
    if selection is not None:
        files = SelectionFiles(selection)
        if not filesystem(files.selection)[0].exists(filesystem(files.selection)[1]):
            raise IteritError(f"{files.selection}: no selection here; give the --output of `iterit select`")
        samples = samples or join(selection, "ingest", "samples.parquet")
        if not filesystem(samples)[0].exists(filesystem(samples)[1]):
            raise IteritError(
                f"{samples}: no samples beside this selection; give the samples' Parquet file (--samples, "
                "or iterit.export(..., samples=...))"
            )
        return Source(samples, {0: files})
    rd = RunDir(run)
    if not rd.exists():
        raise IteritError(f"{run}: not a run directory (no manifest.json); give `iterit run`'s output_dir")
    done = {
        e: rd.selection(e)
        for e in rd.iterations_on_disk()
        if filesystem(rd.selection(e).selection)[0].exists(filesystem(rd.selection(e).selection)[1])
    }
    if not done:
        raise IteritError(f"{run}: no iteration has finished its selection yet")
    return Source(join(rd.ingest, "samples.parquet"), done)


def pick_table(source: Source, iteration: str) -> dict[str, pa.Table]:
    """Output name -> the picks to write (id, rank, ifd, gain, iteration), for `--iteration`:
    a number (that iteration's picks), `all` (one table per iteration) or `union` (every id picked in any
    iteration once, with the first iteration that picked it; in that order, then by rank)."""
    last = max(source.selections)
    if iteration in ("all", "union"):
        chosen = sorted(source.selections)
    else:
        try:
            e = last if iteration == "last" else int(iteration)
        except ValueError:
            raise IteritError(f"--iteration {iteration!r}: expected a number, last, all or union") from None
        if e not in source.selections:
            raise IteritError(
                f"--iteration {e}: no finished selection of that iteration; these have one: "
                f"{sorted(source.selections)}"
            )
        chosen = [e]
    tables = {}
    for e in chosen:
        rows = read_jsonl(source.selections[e].selection, missing_ok=False)
        tables[e] = pa.table(
            {
                "id": pa.array([r["id"] for r in rows], pa.string()),
                "rank": pa.array([r["rank"] for r in rows], pa.int64()),
                "ifd": pa.array([r["ifd"] for r in rows], pa.float64()),
                "gain": pa.array([r["gain"] for r in rows], pa.float64()),
                "iteration": pa.array([e] * len(rows), pa.int64()),
            }
        )
    if iteration == "all":
        return {iteration_key(e): t for e, t in tables.items()}
    if iteration != "union":
        return {iteration_key(chosen[0]): tables[chosen[0]]}
    seen: set[str] = set()
    keep = []
    for e in chosen:  # the first iteration that picked an id keeps it
        ids = tables[e].column("id").to_pylist()
        mask = np.array([i not in seen for i in ids], dtype=bool)
        seen.update(ids)
        keep.append(tables[e].filter(pa.array(mask)))
    union = pa.concat_tables(keep)
    return {"union": union.set_column(1, "rank", pa.array(np.arange(len(union), dtype=np.int64)))}


# --------------------------------------------------------------------------------------------
# The Ray Data job


def _number(x: float) -> float | None:
    return None if x is None or x != x else float(x)  # NaN (no score: random, longest) as JSON null


class _KeepPicks:
    """A batch of samples -> its picked rows in `fmt` with the pick columns, a `sort_key` (the rank) and a
    `refused` reason ("" when written). JSON formats come out as one `record` string a row, the line
    as written (ensure_ascii=False: the texts' own characters)."""

    def __init__(self, picks: pa.Table, fmt: str, plain: bool):
        self.index = {sid: i for i, sid in enumerate(picks.column("id").to_pylist())}
        self.picks, self.fmt, self.plain = picks, fmt, plain

    def __call__(self, batch: pa.Table) -> pa.Table:
        at = [self.index.get(sid) for sid in batch.column("id").to_pylist()]
        rows = [i for i, j in enumerate(at) if j is not None]
        batch = batch.take(pa.array(rows, pa.int64()))
        picks = self.picks.take(pa.array([at[i] for i in rows], pa.int64()))
        extra = [] if self.plain else [*PICK_COLUMNS, "iteration"]
        if self.fmt in ("parquet", "hf"):
            out = {"id": batch.column("id"), "messages": batch.column("messages")}
            out.update({c: picks.column(c) for c in extra})
            refused = [""] * len(rows)
        else:
            records, refused = [], []
            pick_rows = picks.to_pylist()
            for sid, messages, pick in zip(
                batch.column("id").to_pylist(), batch.column("messages").to_pylist(), pick_rows
            ):
                rec = as_record(messages, self.fmt)
                refused.append("" if rec is not None else "multi_turn")
                head = {} if self.plain else {"id": sid}
                tail = {c: pick[c] if c in ("rank", "iteration") else _number(pick[c]) for c in extra}
                records.append(json.dumps({**head, **(rec or {}), **tail}, ensure_ascii=False))
            out = {"record": pa.array(records, pa.string())}
        out["sort_key"] = picks.column("rank")
        out["refused"] = pa.array(refused, pa.string())
        return pa.table(out)


def _names(suffix: str):
    """Parts named by their place in the dataset, so a listing sorted by name is the pick order."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid, task_index):
            return f"part-{task_index:05d}-{write_uuid}{suffix}"  # Ray's parquet write wants the uuid

    return PartNames()


def _jsonl_sink(path: str):
    """Ray's block file datasink writing the `record` column as JSON Lines."""
    from ray.data.datasource import BlockBasedFileDatasink

    class JSONLines(BlockBasedFileDatasink):
        def write_block_to_file(self, block, file):
            lines = block.to_arrow().column("record").to_pylist()
            file.write("".join(line + "\n" for line in lines).encode("utf-8"))

    return JSONLines(path, filename_provider=_names(".jsonl"), file_format="jsonl")


def _parts(folder: str, suffix: str) -> list[str]:
    fs, p = filesystem(folder)
    return sorted(f for f in fs.ls(p, detail=False) if f.endswith(suffix))


def summary_path(output: str) -> str:
    """Beside the output, not in it: trainers that read a folder (LLaMA-Factory, axolotl) read every
    file there as data."""
    return str(output).rstrip("/") + ".export.json"


def check_output(fmt: str, output: str) -> str | None:
    """Refuse a format or an output name that cannot hold it before any work; the single-file suffix
    of `output` (None: a folder of parts)."""
    if fmt not in FORMATS:
        raise IteritError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    single = next((s for s in SINGLE_FILE_SUFFIXES if str(output).endswith(s)), None)
    if single is not None and fmt not in SINGLE_FILE_SUFFIXES[single]:
        fits = next((s for s, f in SINGLE_FILE_SUFFIXES.items() if fmt in f), None)
        raise IteritError(
            f"--output {output}: a {single} file cannot hold --format {fmt}; "
            + (f"name a {fits} file or a folder" if fits else "give a folder")
        )
    fs, path = filesystem(output)
    if fs.exists(path):
        raise IteritError(f"{output} exists; export does not overwrite: remove it or give another --output")
    return single


def export(
    source: Source,
    fmt: str,
    output: str,
    iteration: str = "last",
    plain: bool = False,
    log=print,
) -> dict:
    """Write the picks of `source` in `fmt` at `output`: a folder of parts in pick order, or one file when
    `output` ends in .jsonl (JSON formats) or .parquet. `iteration`: a number, last, all (a folder per
    iteration under `output`) or union. Returns the summary, also written to summary_path(output)."""
    import ray
    from ray.data.expressions import col

    from iterit import cluster

    single = check_output(fmt, output)
    tables = pick_table(source, iteration)
    if single is not None and len(tables) > 1:
        raise IteritError(
            f"--iteration all writes a folder per iteration: give a folder as --output, not {output}"
        )
    t0 = time.perf_counter()
    cluster.connect()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    summary = {
        "format": fmt,
        "iteration": iteration,
        "plain": plain,
        "samples": source.samples,
        "outputs": {},
    }
    for name, picks in tables.items():
        target = output if len(tables) == 1 else join(output, name)
        fs, target_path = filesystem(target)
        ds = ray.data.read_parquet(cluster.absolute(source.samples)).select_columns(["id", "messages"])
        ds = ds.map_batches(
            _KeepPicks, fn_constructor_args=(picks, fmt, plain), batch_format="pyarrow", concurrency=(1, cpus)
        ).materialize()  # k rows, on the cluster: counted, then sorted and written
        refused = sum(
            int(pc.sum(pc.not_equal(b["refused"], "")).as_py() or 0)
            for b in ds.select_columns(["refused"]).iter_batches(batch_format="pyarrow")
        )
        found = ds.count()
        if found != len(picks):
            raise IteritError(
                f"{source.samples}: {len(picks) - found:,} of the {len(picks):,} picks of {name} are not "
                "among the samples; was this selection made on another corpus?"
            )
        ds = ds.filter(expr=col("refused") == "").sort("sort_key").drop_columns(["sort_key", "refused"])
        # The workers write the parts: a relative path would land in their own working directories.
        parts = cluster.absolute(target if single is None else f"{target}.parts-{uuid.uuid4().hex[:8]}")
        if single is not None:
            ds = ds.repartition(1)  # without a shuffle: the sorted blocks, concatenated in order
        if fmt == "hf":
            ds.write_parquet(parts + ".parquet-parts", filename_provider=_names(".parquet"))
            _save_to_disk(parts + ".parquet-parts", target)
        elif fmt == "parquet":
            ds.write_parquet(parts, filename_provider=_names(".parquet"))
        else:
            ds.write_datasink(_jsonl_sink(parts))
        if single is not None:
            (only,) = _parts(parts, single)
            fs.mv(only, target_path)
            fs.rm(filesystem(parts)[1], recursive=True)
        if fmt in LLAMA_FACTORY_ENTRIES:
            stem = _stem(output)
            _write_dataset_info(target, fmt, stem if len(tables) == 1 else f"{stem}_{name}")
        written = found - refused
        summary["outputs"][name] = {
            "path": target,
            "picks": len(picks),
            "written": written,
            "refused": refused,
        }
        log(
            f"export {name}: {written:,} of {len(picks):,} picks as {fmt} -> {target}"
            + (
                f" ({refused:,} refused: a conversation with earlier turns has no alpaca form)"
                if refused
                else ""
            )
        )
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(summary_path(output), json.dumps(summary, indent=2) + "\n")
    return summary


def _save_to_disk(parts: str, target: str) -> None:
    """Parquet parts -> a `save_to_disk` folder (datasets memory-maps the k rows; the parts go after)."""
    import datasets

    fs, p = filesystem(parts)
    ds = datasets.load_dataset("parquet", data_files=_parts(parts, ".parquet"), split="train")
    ds.save_to_disk(target)
    fs.rm(p, recursive=True)


def _stem(output: str) -> str:
    last = str(output).rstrip("/").rpartition("/")[2]
    return next((last[: -len(s)] for s in SINGLE_FILE_SUFFIXES if last.endswith(s)), last)


def _write_dataset_info(target: str, fmt: str, name: str) -> None:
    """LLaMA-Factory's dataset_info.json beside the output (its `dataset_dir`), merged into one there:
    `name` is what a LLaMA-Factory config's `dataset:` gives."""
    parent, _, file_name = str(target).rstrip("/").rpartition("/")
    parent = parent or "."
    path = join(parent, "dataset_info.json")
    fs, p = filesystem(path)
    info = json.loads(fs.cat(p)) if fs.exists(p) else {}
    info[name] = {"file_name": file_name, **LLAMA_FACTORY_ENTRIES[fmt]}
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")
