"""Ingest: read corpora, detect the row format, normalise to chat messages, keep ids, reject with reasons.

    files / dirs / globs / fsspec URIs / Hugging Face datasets (hub ids, save_to_disk folders)
      -> records   (JSONL line by line, JSON arrays element by element, Parquet batch by batch,
                    datasets row by row: memory-mapped or streamed)
      -> normalise (alpaca | sharegpt | messages -> [system, ..., assistant: response])
      -> samples.parquet + rejects.jsonl + summary.json

Everything streams: memory is bounded by one Parquet row group and one input element, whatever the
file size. Invariant, per file: accepted + rejected = rows read. A row that cannot be used is written
to rejects.jsonl with a reason from REJECT_REASONS; nothing disappears silently.
"""

from __future__ import annotations

import dataclasses
import io
import json
import lzma
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from iterit.config import DEFAULT_SYSTEM_PROMPT, DatasetConfig
from iterit.errors import IteritError, RowError
from iterit.io import atomic_open, atomic_write_text, filesystem, join, read_parquet

# The fixed vocabulary of reject reasons (docs/architecture.md section 3); later stages add theirs here too.
REJECT_REASONS = {
    "unreadable_file": "the file could not be opened or decoded as its format (e.g. a corrupt Parquet file)",
    "invalid_json": "the line or array element is not valid JSON",
    "bad_encoding": "the text holds bytes that are not valid UTF-8",
    "wrong_type": "a field has the wrong type (a number where text belongs, a row that is no object, ...)",
    "missing_field": "a required field is absent (instruction/output, conversations or messages)",
    "bad_role": "a turn's role is none of system/user/assistant (or ShareGPT's human/gpt/system)",
    "no_response": "the conversation has no assistant turn to learn from",
    "empty_response": "the response (the last assistant turn) is empty or only whitespace",
    "duplicate_id": "the id was already used by an earlier row of this run",
    "response_truncated": "at sequence_len, no response token is left after the prompt",
    "template_error": "the chat template raised on the conversation (the detail is the template's message)",
    "nonfinite_loss": "scoring produced a NaN or infinite loss",
}

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
SAMPLE_SCHEMA = pa.schema(
    [("id", pa.string()), ("messages", pa.list_(MESSAGE_TYPE)), ("source", pa.string()), ("row", pa.int64())]
)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    # ShareGPT dumps name the answering model in `from`; all of them are the assistant.
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_ELEMENT_CHARS = 256 << 20  # a JSON array element larger than this is rejected, not buffered
ROW_GROUP_ROWS = 4096
ROW_GROUP_CHARS = 64 << 20


# --------------------------------------------------------------------------------------------
# Finding files


def _split_name(path: str) -> tuple[str, str | None]:
    """('train', 'jsonl') for '.../train.jsonl.gz'; format None when the suffix is unknown."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    stem, dot, ext = name.rpartition(".")
    return (stem, FORMATS.get("." + ext.lower())) if dot else (name, None)


def expand_paths(spec: str) -> list[str]:
    """A file, a directory (searched recursively for known formats) or a glob -> sorted file URIs."""
    fs, p = filesystem(spec)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    uri = (lambda f: f) if proto in ("file", "local") else fs.unstrip_protocol
    known = ", ".join(sorted(FORMATS)) + f" (optionally {'/'.join(COMPRESSIONS)})"
    if any(c in p for c in "*?["):
        files = sorted(f for f in fs.glob(p) if fs.isfile(f))
        if not files:
            raise IteritError(
                f"no files match {spec}: check the pattern (quote it so the shell does not expand it)"
            )
    elif fs.isdir(p):
        files = sorted(f for f in fs.find(p) if _split_name(f)[1])
        if not files:
            raise IteritError(f"no data files in directory {spec}: expected {known}")
    elif fs.isfile(p):
        files = [p]
    else:
        raise IteritError(
            f"data path not found: {spec} (give a file, a directory, a glob or an s3://, gs:// URI)"
        )
    unknown = [f for f in files if not _split_name(f)[1]]
    if unknown:
        raise IteritError(f"unknown data format: {uri(unknown[0])}: expected {known}")
    return [uri(f) for f in files]


def sources(ds: DatasetConfig) -> list:
    """What a dataset entry reads: [HFSource] for a Hugging Face dataset (opened here, so a bad one fails
    before any output), else its files (expand_paths)."""
    src = hf_source(ds)
    if src is None:
        return expand_paths(ds.path)
    _, split = open_hf(src)
    return [dataclasses.replace(src, split=split)]


def id_prefixes(files: list[str]) -> dict[str, str]:
    """Default id prefix per file: its stem, or its relative path when two inputs share a stem."""
    stems = {f: _split_name(f)[0] for f in files}
    if len(set(stems.values())) == len(files):
        return stems
    common = os.path.commonpath([f.split("://")[-1] for f in files]) if len(files) > 1 else ""
    out = {}
    for f in files:
        rel = f.split("://")[-1][len(common) :].lstrip("/")
        out[f] = rel.rsplit("/", 1)[0] + "/" + stems[f] if "/" in rel else stems[f]
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face datasets: a hub id, a save_to_disk folder, a local dataset repository

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


@dataclass(frozen=True)
class HFSource:
    """A dataset read through `datasets` rather than as files: kind `disk` (load_from_disk), `hub` (a
    hub id) or `repo` (a local dataset repository, load_dataset(folder)). Rows stream one at a time."""

    kind: str
    path: str
    split: str
    name: str | None = None
    revision: str | None = None

    @property
    def dataset(self) -> str:
        """The dataset's name in default ids (`<dataset>:<split>:<row>`): the hub id or the folder."""
        return self.path if self.kind == "hub" else self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.path} [{self.name + ', ' if self.name else ''}{self.split}]"


def _declares_configs(folder: str) -> bool:
    """A dataset repository's card: README.md with YAML front matter naming `configs` or `dataset_info`."""
    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        return False
    with open(card, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    if not head.startswith("---"):
        return False
    front = head[3:].split("\n---", 1)[0]
    return bool(re.search(r"^(configs|dataset_info):", front, re.M))


def hf_source(ds: DatasetConfig) -> HFSource | None:
    """The HFSource a dataset entry names, or None for files (hf://datasets/... paths are files too,
    read through huggingface_hub's fsspec filesystem)."""
    p = ds.path
    if "://" in p:
        return None
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "dataset_dict.json")) or os.path.isfile(
            os.path.join(p, "state.json")
        ):
            return HFSource("disk", p, ds.split or "", ds.name, ds.revision)
        if ds.name or ds.split or _declares_configs(p):
            return HFSource("repo", p, ds.split or "train", ds.name, ds.revision)
        return None
    if (
        not os.path.exists(p)
        and HUB_ID.fullmatch(p)
        and not _split_name(p)[1]
        and not any(c in p for c in "*?[")
    ):
        return HFSource("hub", p, ds.split or "train", ds.name, ds.revision)
    return None


def open_hf(src: HFSource):
    """(the split's rows as a datasets Dataset (memory-mapped Arrow) or a streaming IterableDataset, the
    split's name). Fails with one line naming the dataset and the fix."""
    try:
        import datasets
    except ImportError:
        raise IteritError(
            f"{src.path}: a Hugging Face dataset needs the `datasets` package (pip install datasets)"
        ) from None
    if src.kind == "disk":
        try:
            data = datasets.load_from_disk(src.path)
        except Exception as e:  # noqa: BLE001 - any failure of the folder is the user's to fix
            raise IteritError(
                f"{src.path}: not a readable save_to_disk folder ({type(e).__name__}: {e})"
            ) from None
        if isinstance(data, datasets.DatasetDict):
            splits = list(data)
            split = src.split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
            if split not in data:
                raise IteritError(
                    f"{src.path}: split {src.split or '(none given)'!r} not in this DatasetDict; its splits: "
                    f"{', '.join(splits)} (set `split:` in the dataset entry)"
                )
            return data[split], split
        return data, src.split or str(data.split or "train")
    try:
        data = datasets.load_dataset(
            src.path, name=src.name, split=src.split, revision=src.revision, streaming=True
        )
        return data, src.split
    except Exception as e:  # noqa: BLE001 - network, auth, a wrong name or split: one line, then stop
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        fix = (
            "check the folder's data files and card"
            if src.kind == "repo"
            else "check the id, name and split; offline, set HF_DATASETS_OFFLINE=1 with the dataset in the "
            "cache (HF_HOME), or give a local path (a save_to_disk folder or its data files)"
        )
        raise IteritError(
            f"dataset {src}: could not be loaded ({type(e).__name__}: {first}); {fix}"
        ) from None


def read_hf_records(src: HFSource) -> Iterator[tuple[int, Any]]:
    """(row, record) of an HFSource, streamed; a failure while reading ends it with one unreadable_file
    reject at row -1, as read_records does for a file."""
    row = -1
    try:
        for row, rec in enumerate(open_hf(src)[0]):
            yield row, rec
    except IteritError:
        raise
    except Exception as e:  # noqa: BLE001 - reported as a reject with its cause, never swallowed
        where = "before its first row" if row < 0 else f"after row {row}"
        yield -1, RowError("unreadable_file", f"reading stopped {where}: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------
# Reading records: each reader yields (row, record) or (row, RowError)


def _read_jsonl(lines: Iterable[str], first: int = 0) -> Iterator[tuple[int, Any]]:
    """Rows of JSON Lines; `row` is the 0-based line number, so row + 1 is the line an editor shows."""
    for i, line in enumerate(lines, start=first):
        if i == 0:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, RowError("invalid_json", f"line {i + 1}, column {e.colno}: {e.msg}")
        except RecursionError:
            yield i, RowError("invalid_json", f"line {i + 1}: nested too deeply")


class _ArrayScanner:
    """Decodes a JSON array one element at a time from a text stream, holding one element in memory."""

    def __init__(self, stream: io.TextIOBase, chunk: int = 1 << 20):
        self.stream, self.chunk = stream, chunk
        self.buf, self.pos, self.eof, self.line = "", 0, False, 1

    def fill(self) -> bool:
        if self.eof:
            return False
        self.line += self.buf.count("\n", 0, self.pos)
        data = self.stream.read(self.chunk)
        self.buf, self.pos, self.eof = self.buf[self.pos :] + data, 0, not data
        return bool(data)

    def skip_ws(self) -> str:
        """The next non-whitespace character ('' at end of file), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def here(self) -> int:
        return self.line + self.buf.count("\n", 0, self.pos)


# Where a broken value's successor may start: after a comma in an array, at a line start otherwise.
_NEXT_IN_ARRAY = re.compile(r",\s*\{")
_NEXT_IN_STREAM = re.compile(r"\n[ \t]*\{")


def _maybe_cut(sc: _ArrayScanner, e: json.JSONDecodeError) -> bool:
    """Could this error go away with more input (the value runs past the buffer)?"""
    return e.msg.startswith("Unterminated string") or e.pos >= len(sc.buf.rstrip()) - 8


def _read_json_values(
    stream: io.TextIOBase, chunk: int = 1 << 20, array: bool = True
) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array (or, array=False, whitespace-separated JSON values) one at a time."""
    dec = json.JSONDecoder()
    sc = _ArrayScanner(stream, chunk)
    kind = "array element" if array else "value"
    if array:
        if sc.skip_ws() != "[":
            raise AssertionError("caller checked for '['")
        sc.pos += 1
    row, indent = 0, None
    while True:
        c = sc.skip_ws()
        if array and row and c == ",":
            sc.pos += 1
            c = sc.skip_ws()
        if c == "" or (array and c == "]"):
            return  # a clean end, or a file cut between elements: no row lost
        if row == 0:
            # Pretty-printed files put every element at the same indentation; resync relies on it.
            seg = sc.buf[sc.buf.rfind("\n", 0, sc.pos) + 1 : sc.pos]
            indent = seg if not seg.strip() and (seg or not array) else None
        try:
            obj, end = dec.raw_decode(sc.buf, sc.pos)
            if end >= len(sc.buf) and not sc.eof:  # a number cut at the buffer's end: read on
                sc.fill()
                continue
        except json.JSONDecodeError as e:
            if _maybe_cut(sc, e) and not sc.eof and len(sc.buf) - sc.pos < MAX_ELEMENT_CHARS:
                sc.fill()
                continue
            line = sc.line + sc.buf.count("\n", 0, e.pos)
            column = e.pos - sc.buf.rfind("\n", 0, e.pos)
            cut = sc.eof and (e.msg.startswith("Unterminated string") or e.pos >= len(sc.buf.rstrip()))
            what = "the file ends inside it" if cut else e.msg
            yield row, RowError("invalid_json", f"{kind} {row} (line {line}, column {column}): {what}")
            row += 1
            if cut or not _resync(
                sc, dec, _NEXT_IN_ARRAY if array else _NEXT_IN_STREAM, indent, array, e.pos
            ):
                return
            continue
        except RecursionError:
            yield row, RowError("invalid_json", f"{kind} {row} (line {sc.here()}): nested too deeply")
            row += 1
            if not _resync(sc, dec, _NEXT_IN_ARRAY if array else _NEXT_IN_STREAM, indent, array, sc.pos + 1):
                return
            continue
        yield row, obj
        row += 1
        sc.pos = end


def _resync(
    sc: _ArrayScanner, dec: json.JSONDecoder, pattern: re.Pattern, indent: str | None, array: bool, frm: int
) -> bool:
    """After a broken value, move to the next object that starts at the same level (and decodes)."""
    while True:
        pending = None  # a candidate that may decode once more input is read
        for m in pattern.finditer(sc.buf, frm):
            brace = m.end() - 1
            if indent is not None and sc.buf[sc.buf.rfind("\n", 0, brace) + 1 : brace] != indent:
                continue
            try:
                _, end = dec.raw_decode(sc.buf, brace)
            except json.JSONDecodeError as e:
                if not sc.eof and _maybe_cut(sc, e) and len(sc.buf) - brace < MAX_ELEMENT_CHARS:
                    pending = m.start()
                    break
                continue
            except RecursionError:
                continue
            after = sc.buf[end : end + 64].lstrip()
            if not after and not sc.eof:
                pending = m.start()
                break
            if not array or after[:1] in (",", "]") or not after:
                sc.pos = brace
                return True
        keep = pending if pending is not None else max(sc.pos, len(sc.buf) - 64)
        sc.line += sc.buf.count("\n", 0, keep)
        sc.buf, sc.pos = sc.buf[keep:], 0
        if not sc.fill() and pending is None:
            return False
        frm = 0


def read_records(uri: str) -> Iterator[tuple[int, Any]]:
    """(row, record) pairs of one file; rows that cannot be decoded come as (row, RowError).

    A file that cannot be read on (a corrupt Parquet file or compressed stream, a vanished object)
    ends with one `unreadable_file` reject at row -1: the rows before it are kept.
    """
    last = None
    try:
        for row, rec in _read_file(uri):
            last = row
            yield row, rec
    except (OSError, EOFError, zlib.error, lzma.LZMAError, pa.ArrowException) as e:
        where = "before its first row" if last is None else f"after row {last}"
        yield -1, RowError("unreadable_file", f"reading stopped {where}: {type(e).__name__}: {e}")


def _read_file(uri: str) -> Iterator[tuple[int, Any]]:
    fmt = _split_name(uri)[1]
    fs, p = filesystem(uri)
    with fs.open(p, "rb", compression="infer") as f:
        if fmt == "parquet":
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    yield row, rec
                    row += 1
            return
        # surrogateescape keeps invalid bytes visible; normalise() rejects them per row as bad_encoding.
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="\n")
        if fmt != "json":
            yield from _read_jsonl(text)
            return
        head, skipped_lines = text.read(1), 0
        while head and head in " \t\r\n\ufeff":
            skipped_lines += head == "\n"
            head = text.read(1)
        if head == "[":
            yield from _read_json_values(_Prepend(head, text), array=True)
            return
        # JSON Lines saved as .json (what `datasets.to_json` writes) keep line-by-line recovery;
        # anything else (one pretty-printed object, values over several lines) is a value stream.
        first = head + text.readline()
        try:
            json.loads(first)
            yield from _read_jsonl(_Prepend(first, text), first=skipped_lines)
        except (json.JSONDecodeError, RecursionError):
            yield from _read_json_values(_Prepend(first, text), array=False)


class _Prepend(io.TextIOBase):
    """A text stream with an already-read prefix put back in front."""

    def __init__(self, prefix: str, rest: io.TextIOBase):
        self.prefix, self.rest = prefix, rest

    def read(self, n: int = -1) -> str:
        out, self.prefix = self.prefix, ""
        return out + self.rest.read(-1 if n < 0 else max(0, n - len(out)))

    def __iter__(self) -> Iterator[str]:
        first = self.prefix if self.prefix.endswith("\n") else self.prefix + self.rest.readline()
        self.prefix = ""
        if first:
            yield first
        yield from self.rest


# --------------------------------------------------------------------------------------------
# Normalising one record (pure: no I/O)


def _kind(v: Any) -> str:
    """A value's type in JSON's words."""
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _text(rec: dict, key: str, *, required: bool) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise RowError("missing_field", f"no '{key}' field" if key not in rec else f"'{key}' is null")
        return None
    v = rec[key]
    if not isinstance(v, str):
        raise RowError("wrong_type", f"'{key}' is {_kind(v)}, expected a string")
    return v


def _content(turn: dict, key: str, where: str) -> str:
    v = turn.get(key)
    if isinstance(v, list):  # OpenAI content parts: keep text parts, refuse others
        parts = []
        for part in v:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise RowError("wrong_type", f"{where}: content part of type {kind!r} is not text")
            parts.append(part["text"])
        return "".join(parts)
    if v is None:
        raise RowError("missing_field", f"{where}: no '{key}'")
    if not isinstance(v, str):
        raise RowError("wrong_type", f"{where}: '{key}' is {_kind(v)}, expected a string")
    return v


def _turns(rec: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    turns = rec[key]
    if not isinstance(turns, list):
        raise RowError("wrong_type", f"'{key}' is {_kind(turns)}, expected an array of turns")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError("wrong_type", f"{where} is {_kind(turn)}, expected an object")
        role = turn.get(role_key)
        if not isinstance(role, str) or role.lower() not in roles:
            raise RowError("bad_role", f"{where}: {role_key}={role!r}, expected one of {sorted(set(roles))}")
        out.append({"role": roles[role.lower()], "content": _content(turn, text_key, where)})
    return out


def detect_format(rec: dict, ds: DatasetConfig) -> str:
    if ds.type != "auto":
        return ds.type
    if ds.field_messages in rec:
        return "messages"
    if ds.field_conversations in rec:
        return "sharegpt"
    if ds.field_instruction in rec or ds.field_output in rec:
        return "alpaca"
    raise RowError(
        "missing_field",
        f"none of '{ds.field_instruction}'/'{ds.field_output}' (Alpaca), '{ds.field_conversations}' "
        f"(ShareGPT) or '{ds.field_messages}' (messages); fields present: {sorted(rec)[:8]}",
    )


def normalise(rec: Any, ds: DatasetConfig, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """One input record -> chat messages: system turn first, the response (last assistant turn) last.

    Turns after the last assistant turn are dropped (docs/architecture.md section 2). Raises RowError.
    """
    if not isinstance(rec, dict):
        raise RowError("wrong_type", f"the row is {_kind(rec)}, expected a JSON object")
    fmt = detect_format(rec, ds)
    if fmt == "alpaca":
        instruction = _text(rec, ds.field_instruction, required=True)
        extra = _text(rec, ds.field_input, required=False)
        response = _text(rec, ds.field_output, required=True)
        user = instruction + "\nInput: " + extra if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    else:
        key = ds.field_conversations if fmt == "sharegpt" else ds.field_messages
        if key not in rec:
            raise RowError("missing_field", f"no '{key}' field")
        if fmt == "sharegpt":
            messages = _turns(rec, key, "from", "value", SHAREGPT_ROLES)
        else:
            messages = _turns(rec, key, "role", "content", MESSAGE_ROLES)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RowError("no_response", f"no assistant turn among {len(messages)} turns")
        messages = messages[: last + 1]
    if not messages[-1]["content"].strip():
        raise RowError(
            "empty_response", "the response is empty" if not messages[-1]["content"] else "only whitespace"
        )
    if messages[0]["role"] != "system":
        own = rec.get(ds.field_system)
        if own is not None and not isinstance(own, str):
            raise RowError("wrong_type", f"'{ds.field_system}' is {_kind(own)}, expected a string")
        if own or system_prompt is not None:
            messages.insert(0, {"role": "system", "content": own or system_prompt})
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            bad = m["content"][e.start]
            code = ord(bad) - 0xDC00 if 0xDC80 <= ord(bad) <= 0xDCFF else None
            what = f"byte 0x{code:02x}" if code is not None else f"lone surrogate U+{ord(bad):04X}"
            raise RowError("bad_encoding", f"turn {i} ({m['role']}): {what} at character {e.start}") from None
    return messages


def sample_id(rec: dict, ds: DatasetConfig, default: str) -> str:
    v = rec.get(ds.field_id)
    if v is None or v == "":
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise RowError("wrong_type", f"'{ds.field_id}' is {_kind(v)}, expected a string or an integer")
    return str(v)


# --------------------------------------------------------------------------------------------
# The ingest stage


@dataclass
class FileStats:
    source: str
    read: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "read": self.read,
            "accepted": self.accepted,
            "rejected": sum(self.rejected.values()),
            "by_reason": dict(self.rejected),
        }


def iter_samples(
    inputs: list[tuple[DatasetConfig, str]], system_prompt: str | None, stats: list[FileStats]
) -> Iterator[tuple[dict | None, dict | None]]:
    """(sample, None) for each accepted row, (None, reject) for each rejected one; fills `stats`.

    `inputs` are (dataset, file URI) pairs, from expand_paths."""
    prefixes = id_prefixes([f for _, f in inputs if isinstance(f, str)])
    prefixes.update({f: f"{f.dataset}:{f.split}" for _, f in inputs if isinstance(f, HFSource)})
    # Duplicate detection is the one thing that grows with the corpus: ~100 bytes per id
    # (the id and its first (file, row), packed in one int).
    seen: dict[str, int] = {}
    taken: Counter = Counter()  # rows read per dataset, for max_samples
    for file_index, (ds, uri) in enumerate(inputs):
        st = FileStats(str(uri))
        stats.append(st)
        for row, rec in read_hf_records(uri) if isinstance(uri, HFSource) else read_records(uri):
            if ds.max_samples is not None and taken[id(ds)] >= ds.max_samples:
                break
            taken[id(ds)] += 1
            st.read += 1
            sid = None
            try:
                if isinstance(rec, RowError):
                    raise rec
                messages = normalise(rec, ds, system_prompt)
                sid = sample_id(rec, ds, f"{prefixes[uri]}:{row}")
                if sid in seen:
                    first_file, first_row = divmod(seen[sid], 1 << 40)
                    raise RowError(
                        "duplicate_id", f"id {sid!r} was first used at {inputs[first_file][1]}:{first_row}"
                    )
            except RowError as e:
                st.rejected[e.reason] += 1
                yield (
                    None,
                    {
                        "source": str(uri),
                        "row": row if row >= 0 else None,
                        "id": sid,
                        "reason": e.reason,
                        "detail": e.detail,
                    },
                )
                continue
            seen[sid] = (file_index << 40) + row
            st.accepted += 1
            yield {"id": sid, "messages": messages, "source": str(uri), "row": row}, None


def ingest(
    datasets: list[DatasetConfig], output_dir: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> dict:
    """Normalise every input into OUTPUT/samples.parquet; OUTPUT/rejects.jsonl; OUTPUT/summary.json."""
    t0 = time.perf_counter()
    inputs = [(ds, f) for ds in datasets for f in sources(ds)]  # bad paths fail before any output
    stats: list[FileStats] = []
    samples_path, rejects_path = join(output_dir, "samples.parquet"), join(output_dir, "rejects.jsonl")
    batch: list[dict] = []
    batch_chars = 0
    with atomic_open(samples_path) as fout, atomic_open(rejects_path, "w") as frej:
        with pq.ParquetWriter(fout, SAMPLE_SCHEMA, compression="zstd") as writer:
            for sample, reject in iter_samples(inputs, system_prompt, stats):
                if reject is not None:
                    frej.write(json.dumps(reject, ensure_ascii=False) + "\n")
                    continue
                batch.append(sample)
                batch_chars += sum(len(m["content"]) for m in sample["messages"])
                if len(batch) >= ROW_GROUP_ROWS or batch_chars >= ROW_GROUP_CHARS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=SAMPLE_SCHEMA))
                    batch, batch_chars = [], 0
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=SAMPLE_SCHEMA))
    files = [s.as_dict() for s in stats]
    by_reason = sum((s.rejected for s in stats), Counter())
    summary = {
        "read": sum(s.read for s in stats),
        "accepted": sum(s.accepted for s in stats),
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(by_reason.most_common()),
        "files": files,
        "samples": samples_path,
        "rejects": rejects_path,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_text(join(output_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if summary["accepted"] == 0:
        top = ", ".join(f"{r} x{n}" for r, n in by_reason.most_common(3)) or "every file was empty"
        raise IteritError(
            f"no valid rows in {', '.join(s.source for s in stats)} ({summary['read']} read; {top}); "
            f"see {rejects_path} and fix the rows or the dataset 'type'/'field_*' mapping"
        )
    return summary


def format_summary(summary: dict) -> str:
    """A short table a person reads after ingest."""
    lines = [f"{'file':<48} {'read':>9} {'accepted':>9} {'rejected':>9}  reasons"]
    for f in summary["files"]:
        name = f["source"] if len(f["source"]) <= 48 else "..." + f["source"][-45:]
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(f["by_reason"].items(), key=lambda x: -x[1]))
        lines.append(f"{name:<48} {f['read']:>9,} {f['accepted']:>9,} {f['rejected']:>9,}  {reasons}")
    lines.append(f"{'total':<48} {summary['read']:>9,} {summary['accepted']:>9,} {summary['rejected']:>9,}")
    lines.append(
        f"samples: {summary['samples']}   rejects: {summary['rejects']}   ({summary['seconds']:.1f} s)"
    )
    return "\n".join(lines)


def read_samples(path: str) -> pa.Table:
    """The normalised sample table written by ingest."""
    return read_parquet(path, schema=SAMPLE_SCHEMA)
