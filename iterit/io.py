"""Files on local disks and fsspec URIs (s3://, gs://, memory://), written atomically.

Every output is written under a temporary name and renamed when complete, so a crash never
leaves a half file that looks whole (docs/architecture.md section 3).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.core import url_to_fs

from iterit.errors import IteritError


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or any fsspec URI. Its listings are fresh: s3fs and
    gcsfs cache directory listings per instance, and fsspec shares instances, so the parts that Ray's
    workers wrote from other processes would stay invisible to the driver (found by the S3 tests)."""
    fs, p = url_to_fs(os.path.expanduser(str(path)))
    fs.invalidate_cache()
    return fs, p


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
    except BaseException as e:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise no_space(path) from e
        raise


def no_space(path: str) -> IteritError:
    """The one line for a write that found its disk full: the path, the free space left, what to do."""
    free = ""
    if "://" not in str(path):
        at = os.path.dirname(os.path.abspath(os.path.expanduser(str(path))))
        while at and not os.path.exists(at):
            at = os.path.dirname(at)
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(at)
            free = f" ({usage.free / 2**30:,.2f} GiB free of {usage.total / 2**30:,.1f} GiB on {at})"
    return IteritError(
        f"{path}: no space left on the device{free}; nothing half-written was kept: free space, then "
        "resume (`iterit run --resume RUN`; a stage goes on where it stopped)"
    )


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


MODEL_COPIES_KEPT = 2  # an iteration's model and the one before it: 16 GB each at 8B parameters


def _prune_copies(root: str, keep: int) -> None:
    """Remove all but the `keep` newest model copies under root (temporary ones included once an hour
    old): a node would otherwise keep every iteration's export. A copy still being read is safe to
    remove: transformers memory-maps safetensors, and an unlinked file stays readable while mapped."""
    import time

    if not os.path.isdir(root):
        return
    entries = [os.path.join(root, n) for n in os.listdir(root)]
    done = sorted((e for e in entries if ".tmp-" not in e), key=os.path.getmtime, reverse=True)
    stale = [e for e in entries if ".tmp-" in e and time.time() - os.path.getmtime(e) > 3600]
    for old in done[keep:] + stale:
        shutil.rmtree(old, ignore_errors=True)


def local_copy(path: str) -> str:
    """A model folder on object storage (an iteration's export on s3://) copied once to this machine's
    disk, for libraries that read local folders only (transformers' from_pretrained); local paths and
    hub ids as they are. Keyed by the URI and its config.json's version (ETag, modification time,
    size), so a folder written again is fetched again. Copied under a temporary name and renamed when
    whole: actors of one node loading at once share one complete copy. A node keeps the
    MODEL_COPIES_KEPT newest copies."""
    if "://" not in str(path):
        return path
    fs, p = filesystem(path)
    p = p.rstrip("/")
    try:
        info = fs.info(join(p, "config.json"))
    except FileNotFoundError:
        info = {}
    version = "/".join(str(info.get(k, "")) for k in ("ETag", "LastModified", "mtime", "created", "size"))
    key = hashlib.sha1(f"{path}\0{version}".encode()).hexdigest()[:16]
    dest = os.path.join(tempfile.gettempdir(), "iterit-models", f"{p.rsplit('/', 1)[-1]}-{key}")
    if os.path.isdir(dest):
        return dest
    _prune_copies(os.path.dirname(dest), keep=MODEL_COPIES_KEPT - 1)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        for remote in fs.find(p):
            local = os.path.join(tmp, remote[len(p) :].lstrip("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(remote, local)
        os.rename(tmp, dest)
    except OSError:
        if not os.path.isdir(dest):  # not another actor's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
