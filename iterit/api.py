"""The Python API: iterit's stages as functions, for notebooks and for Ray Data pipelines of your own
(docs/api.md). `import iterit` exposes them; the CLI's commands run the same stage code.

    iterit.ingest(paths, output)                      -> summary (summary["samples"]: samples.parquet)
    iterit.score(samples, model=...)                  -> a lazy ray.data.Dataset of scored rows
    iterit.select(scores, samples, k, output=...)     -> the picks, in pick order
    iterit.export(source, output, format=...)         -> the export's summary
    iterit.run(config)                                -> the run's result (the whole loop)

Heavy imports (torch, transformers, Ray) happen inside the functions: `import iterit` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iterit.config import DEFAULT_SYSTEM_PROMPT
from iterit.errors import IteritError

if TYPE_CHECKING:
    import ray.data

    from iterit.config import Config

SAMPLE_COLUMNS = ("id", "messages")


def _as_samples(batch):
    """A user's (id, messages) rows as the samples table's columns: `source` names the origin, `row` is
    unknown (-1) in a dataset without a file."""
    import pyarrow as pa

    from iterit.data import SAMPLE_SCHEMA

    n = batch.num_rows
    return pa.table(
        {
            "id": batch.column("id").cast(pa.string()),
            "messages": batch.column("messages").cast(SAMPLE_SCHEMA.field("messages").type),
            "source": pa.array(["ray.data.Dataset"] * n, pa.string()),
            "row": pa.array([-1] * n, pa.int64()),
        },
        schema=SAMPLE_SCHEMA,
    )


def ingest(
    paths: str | list[str],
    output: str,
    *,
    type: str = "auto",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    **fields: Any,
) -> dict:
    """Normalise files, globs, URIs or Hugging Face datasets into OUTPUT/samples.parquet (with
    rejects.jsonl and summary.json). `fields`: DatasetConfig's keys (field_instruction, field_system,
    max_samples, name, split, ...) for every path. Returns the summary: read, accepted, rejected by
    reason, and the `samples` path."""
    from iterit.config import DatasetConfig
    from iterit.data import ingest as run_ingest

    paths = [paths] if isinstance(paths, str) else list(paths)
    return run_ingest([DatasetConfig(path=p, type=type, **fields) for p in paths], output, system_prompt)


def score(
    samples: str | ray.data.Dataset,
    *,
    model: str,
    sequence_len: int = 2048,
    chat_template: str | None = None,
    prior: bool = True,
    **scoring: Any,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of scored rows: nothing runs until it is consumed, so it composes with your
    own `filter`, `map_batches` and `write_*`. `samples`: a samples.parquet path (from `ingest`) or a
    Ray Dataset with the samples' `id` and `messages` columns (messages: [{role, content}], the
    response last). Each row: id, ifd, loss_cond, loss_prior, token counts, the response embedding, and
    `reject` ("" when scored, else the reason, e.g. response_truncated). `scoring`: the config's scoring
    keys (batch_size, dtype, min_actors, max_actors, gpus_per_actor, embeddings, ...). `prior=False`:
    the conditional pass only (no IFD). Starts or joins Ray as the CLI does (RAY_ADDRESS)."""
    import ray

    from iterit import cluster
    from iterit.config import config_from_dict
    from iterit.scoring.pipeline import scoring_dataset

    tree = {
        "base_model": model,
        "datasets": [{"path": samples if isinstance(samples, str) else "<a Ray Dataset>"}],
        "sequence_len": sequence_len,
        "chat_template": chat_template,
        "scoring": scoring,
    }
    cfg = config_from_dict(tree, "iterit.score")
    cluster.connect()
    if isinstance(samples, ray.data.Dataset):
        missing = [c for c in SAMPLE_COLUMNS if c not in samples.schema().names]
        if missing:
            raise IteritError(
                f"iterit.score: the dataset has no {missing} column(s); it needs the samples' id and "
                "messages ([{role, content}], the response last): iterit.ingest writes them"
            )
        rows = samples.select_columns(list(SAMPLE_COLUMNS)).map_batches(_as_samples, batch_format="pyarrow")
        return scoring_dataset(cfg, "", prior=prior, source=rows)
    return scoring_dataset(cfg, cluster.absolute(samples), prior=prior)


def select(
    scores: str,
    samples: str,
    k: int | float,
    *,
    output: str,
    method: str = "iterit",
    decay: float = 0.1,
    seed: int = 42,
    tfidf: str = "auto",
) -> list[dict]:
    """Order the samples by `method` and pick k (a count above 1, or a fraction of the samples): writes
    OUTPUT/selection.jsonl and OUTPUT/order.parquet, as `iterit select`; returns the picks in pick order
    ({id, rank, ifd, gain}). `scores`: a scores folder or file (`iterit score`, or your own written
    `score` dataset), or JSON Lines {id, ifd}."""
    from iterit.config import SelectionConfig
    from iterit.rundir import SelectionFiles
    from iterit.selection.stage import run_selection

    sel = SelectionConfig(ratio=k, decay=decay, method=method, tfidf=tfidf)
    run_selection(
        samples,
        scores,
        sel.num_selected,
        sel.method,
        output,
        decay=sel.decay,
        seed=seed,
        tfidf_mode=sel.tfidf,
    )
    return SelectionFiles(output).read_selection(missing_ok=False)


def export(
    source: str,
    output: str,
    *,
    format: str = "messages",
    iteration: str | int = "last",
    plain: bool = False,
    samples: str | None = None,
) -> dict:
    """Write the picks of `source` (a run directory, or the `output` of `select`) in pick order as
    `format` (messages, sharegpt, alpaca, parquet, hf) at `output`, as `iterit export` does
    (docs/export.md). `samples`: the samples' Parquet file, for a `select` output (which holds only the
    picks). Returns its summary."""
    from iterit.export_data import export as run_export
    from iterit.export_data import find_source
    from iterit.rundir import RunDir

    run, selection = (source, None) if RunDir(source).exists() else (None, source)
    return run_export(
        find_source(run, selection, samples),
        format,
        output,
        iteration=str(iteration),
        plain=plain,
        log=lambda *_: None,
    )


def run(config: str | dict | Config, overrides: list[str] | None = None) -> dict:
    """The whole loop of `iterit run`: a YAML path, a config tree (a dict, as the YAML) or a Config;
    `overrides` as `--set key=value`. Returns the run's result (per-iteration rows, the run directory)."""
    from iterit.config import Config, apply_overrides, config_from_dict, load_config
    from iterit.loop import run as run_loop

    if isinstance(config, str):
        cfg = load_config(config, overrides or [])
    elif isinstance(config, dict):
        cfg = config_from_dict(apply_overrides(config, overrides or []), "iterit.run")
    elif isinstance(config, Config):
        cfg = config if not overrides else config_from_dict(apply_overrides(config.model_dump(), overrides))
    else:
        raise IteritError(
            f"iterit.run: config is {type(config).__name__}; give a YAML path, a dict or a Config"
        )
    return run_loop(cfg)
