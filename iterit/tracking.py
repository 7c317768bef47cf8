"""Optional experiment tracking (`report_to`: tensorboard, mlflow or wandb; off by default).

The run directory stays the record of a run (the report is built from it); a tracker mirrors the same
numbers where teams already look. Training workers log one point per optimizer step from rank 0
(`train/loss`, `train/lr`, `train/tokens_per_s`, x = the global step, which runs on across
iterations); the driver logs each stage's one-line result (`score/*`, `select/*`, `train/*` per
iteration, x = the iteration). Every process that logs opens the same tracking run by name or id:

    tensorboard   event files in RUN/tensorboard (tensorboardX, a Ray dependency);
                  `tensorboard --logdir RUN/tensorboard`
    mlflow        the experiment `iterit`, one MLflow run per iterit run (MLFLOW_TRACKING_URI,
                  default ./mlruns)
    wandb         project `iterit`, one W&B run per iterit run, id from the run directory (WANDB_* variables)

Secrets (WANDB_API_KEY, MLflow credentials) come from the environment, never from the config.
"""

from __future__ import annotations

import hashlib
import os

from iterit.errors import IteritError

INSTALL = {
    "tensorboard": "pip install tensorboardX",
    "mlflow": "pip install mlflow",
    "wandb": "pip install wandb",
}
MODULE = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def run_key(run_dir: str) -> str:
    """A stable id for the tracking run of an iterit run directory (the same on every node, every resume).

    Local paths count as absolute: the driver may hold "runs/x" while its workers get "/home/u/runs/x"."""
    path = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    return "iterit-" + hashlib.sha1(path.rstrip("/").encode()).hexdigest()[:12]


def check_available(report_to: str | None) -> None:
    """Fail before any work when the tracker's package is missing (preflight), with the install line."""
    if not report_to:
        return
    import importlib.util

    if importlib.util.find_spec(MODULE[report_to]) is None:
        raise IteritError(
            f"report_to: {report_to} needs the package {MODULE[report_to]}: {INSTALL[report_to]}"
        )


class Tracker:
    """Log scalar dicts to the configured tracker; with report_to None every call does nothing."""

    def __init__(self, report_to: str | None, run_dir: str, config: dict | None = None):
        self.kind, self._tb = report_to, None
        if report_to == "tensorboard":
            from tensorboardX import SummaryWriter

            from iterit.rundir import RunDir

            # One writer per process; a filename suffix per process keeps concurrent writers apart.
            self._tb = SummaryWriter(RunDir(run_dir).tensorboard, filename_suffix=f".{os.getpid()}")
        elif report_to == "mlflow":
            import mlflow

            mlflow.set_experiment("iterit")
            key = run_key(run_dir)
            found = mlflow.search_runs(filter_string=f"tags.iterit_run = '{key}'", output_format="list")
            if found:
                mlflow.start_run(run_id=found[0].info.run_id)
            else:
                mlflow.start_run(run_name=os.path.basename(run_dir.rstrip("/")), tags={"iterit_run": key})
                if config:
                    mlflow.log_params(_flat(config))
        elif report_to == "wandb":
            import wandb

            wandb.init(
                project=os.environ.get("WANDB_PROJECT", "iterit"),
                id=run_key(run_dir),
                resume="allow",
                name=os.path.basename(run_dir.rstrip("/")),
                config=config,
            )

    def log(self, metrics: dict[str, float], step: int, axis: str = "step") -> None:
        """`axis` names what `step` counts ("step": the global optimizer step; "iteration")."""
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        if self.kind == "tensorboard":
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        elif self.kind == "mlflow":
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()}, step=step)
        elif self.kind == "wandb":
            import wandb

            # W&B steps must only grow within a run, and workers (global step) and the driver
            # (iteration) log different axes: each point carries its own x instead.
            wandb.log({**metrics, axis: step})

    def close(self) -> None:
        if self.kind == "tensorboard":
            self._tb.close()
        elif self.kind == "mlflow":
            import mlflow

            mlflow.end_run()
        elif self.kind == "wandb":
            import wandb

            wandb.finish()


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]  # MLflow caps a param value's length
    return out
