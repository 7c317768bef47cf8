"""Files on local disks and fsspec URIs (s3://, gs://, memory://), written atomically.

Every output is written under a temporary name and renamed when complete, so a crash never
leaves a half file that looks whole (DESIGN section 3).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI."""
    return url_to_fs(os.path.expanduser(str(path)))


def join(base: str, *names: str) -> str:
    return "/".join([str(base).rstrip("/"), *names])


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open `path` for writing under a temporary name; rename into place only if the block succeeds."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
        fs.mv(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def read_parquet(path: str, schema=None, columns: list[str] | None = None):
    """A whole Parquet file (local or URI), or those columns of it, as a pyarrow Table."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, schema=schema, columns=columns)


def read_jsonl(path: str, missing_ok: bool = True) -> list[dict]:
    """Every record of a JSONL file (local or URI); [] for a missing file when missing_ok."""
    import json

    fs, p = filesystem(path)
    if missing_ok and not fs.exists(p):
        return []
    with fs.open(p, "r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(str(path), "w") as f:
        f.write(text)
