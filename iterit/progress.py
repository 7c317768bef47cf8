"""A live view of the stages the cluster computes, from what its workers write: no Ray call, no
traffic but a listing or a small file read every few seconds, so it works the same on a laptop's
Ray and on a cluster writing to s3://.

    scoring_progress(scores_dir, total)   rows in the scores' Parquet parts (footers only), tokens/s
    training_progress(metrics_path, total_steps)   steps in train_metrics.jsonl, the last loss, tokens/s

Each is a context manager around the blocking call (ds.write_parquet, trainer.fit): a thread polls
every `every` seconds and draws a tqdm bar on a terminal; elsewhere (a job log, CI) it prints a plain
line every `line_every` seconds, never a redraw.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time

from tqdm.auto import tqdm

POLL_S = 5.0
LINE_S = 30.0  # a job log gets one line this often


@contextlib.contextmanager
def _live(desc: str, unit: str, total: int, poll, every: float, line_every: float, log):
    """poll() -> (done, postfix text); a tqdm bar on a terminal, plain lines elsewhere."""
    stop, t0 = threading.Event(), time.perf_counter()
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) if tty else None
    start_done = [None]

    def line(done: int, post: str) -> str:
        elapsed = time.perf_counter() - t0
        new = done - (start_done[0] or 0)
        rate = new / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        eta_text = f", ETA {tqdm.format_interval(eta)}" if eta == eta else ""
        return f"  {desc}: {done:,}/{total:,} {unit}s, {rate:,.1f} {unit}s/s{eta_text}{post}"

    def loop():
        last_line = time.perf_counter()
        while not stop.wait(every):
            try:
                done, post = poll()
            except Exception:  # noqa: BLE001 - a half-written file or a listing race: the next poll
                continue
            if start_done[0] is None:
                start_done[0] = done  # a resumed stage: only this attempt's rate
            if bar is not None:
                bar.n = done
                bar.set_postfix_str(post.strip(", "), refresh=False)
                bar.refresh()
            elif time.perf_counter() - last_line >= line_every:
                log(line(done, post))
                last_line = time.perf_counter()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if bar is not None:
            bar.close()


def scoring_progress(
    scores_dir: str, total: int, every: float = POLL_S, line_every: float = LINE_S, log=print
):
    """Rows written to the scores folder's parts against `total` (the rows this stage scores), and
    tokens/s from their token columns. A footer read per new part."""
    import pyarrow.parquet as pq

    from iterit.io import filesystem
    from iterit.rundir import score_parts

    seen: dict[str, int] = {}
    t0 = time.perf_counter()
    tokens = [0]

    def poll():
        for part in score_parts(scores_dir):
            if part not in seen:
                fs, p = filesystem(part)
                with fs.open(p, "rb") as f:
                    meta = pq.ParquetFile(f)
                    seen[part] = meta.metadata.num_rows
                    names = meta.schema_arrow.names
                    cols = [c for c in ("n_prompt_tokens", "n_response_tokens") if c in names]
                    if cols:
                        t = meta.read(columns=cols)
                        tokens[0] += sum(int(t.column(c).to_numpy(zero_copy_only=False).sum()) for c in cols)
        rate = tokens[0] / max(1e-9, time.perf_counter() - t0)
        return sum(seen.values()), f", {rate:,.0f} tokens/s"

    return _live("scoring", "sample", total, poll, every, line_every, log)


def training_progress(
    metrics_path: str, total_steps: int, every: float = POLL_S, line_every: float = LINE_S, log=print
):
    """Steps in the training metrics file (rank 0 appends one JSON line a step) against total_steps,
    the last loss and tokens/s."""
    from iterit.io import filesystem

    def poll():
        fs, p = filesystem(metrics_path)
        if not fs.exists(p):
            return 0, ""
        rows = [json.loads(line) for line in fs.cat_file(p).decode().splitlines() if line.strip()]
        if not rows:
            return 0, ""
        last = rows[-1]
        secs = sum(r.get("seconds", 0.0) for r in rows)
        rate = sum(r.get("tokens", 0) for r in rows) / secs if secs > 0 else 0.0
        return len(rows), f", loss {last.get('loss', float('nan')):.4f}, {rate:,.0f} tokens/s"

    return _live("training", "step", total_steps, poll, every, line_every, log)
