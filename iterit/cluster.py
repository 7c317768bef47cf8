"""Cluster access: starting or joining Ray, and the resource checks of the preflight.

connect()              RAY_ADDRESS set (`ray job submit`, a cluster): join it; else start a Ray on
                       this machine. The only place in iterit that calls ray.init. Quiet unless
                       `iterit --verbose`: workers' output and Ray Data's progress go to Ray's
                       session logs (RAY_LOGS), not the console
is_local()             Ray was started here by iterit: no autoscaler will grow it, so a request
                       that does not fit is an error, not a wait
scoring_gpus(sc)       GPUs per scoring actor (the config's, else 1 when the cluster has GPUs)
check_pool_fits        an actor pool (and Ray Data's own tasks) against the cluster
use_gpu / check_training_fits / check_shared_storage   training workers against the cluster
gpu_memory_bytes       one GPU's memory, for the training memory preflight
"""

from __future__ import annotations

import os

from iterit.errors import IteritError

_started_here = False  # True once connect() started Ray on this machine
VERBOSE_ENV = "ITERIT_VERBOSE"  # `iterit --verbose`: Ray's own console output, as Ray prints it
RAY_LOGS = "/tmp/ray/session_latest/logs"  # Ray's default session logs, on the machine of the head


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _quiet_ray_data() -> None:
    """Ray Data's progress bars and INFO lines off the console: its ray-data.log in Ray's session logs
    keeps every line (Ray Data's own file handler), the console shows errors only."""
    import logging

    from ray.data import DataContext

    for h in logging.getLogger("ray.data").handlers:
        if "File" not in type(h).__name__:
            h.setLevel(logging.ERROR)
    DataContext.get_current().enable_progress_bars = False


def connect() -> None:
    """Join the cluster in RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray; no-op when
    Ray is already up in this process."""
    import ray

    global _started_here
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Quiet by default: the workers' output (Ray Train's and Ray Data's lines, model-loading bars)
    # stays in Ray's session logs instead of interleaving with iterit's own lines.
    quiet = {"logging_level": "WARNING", "log_to_driver": verbose()}
    if address:
        ray.init(address=address, **quiet)
    else:
        # One logical CPU more than the cores: Ray Data's checkpoint filter (a resumed scoring stage)
        # is an actor that reserves a CPU and does little work; without it, a one-machine Ray whose
        # cores the scoring actors hold would wait forever on a resume.
        ray.init(num_cpus=(os.cpu_count() or 1) + 1, **quiet)
    if not verbose():
        _quiet_ray_data()
    _started_here = address is None


def logs_line(run_dir: str | None = None) -> str:
    """Where Ray's own output went (the first line of a run): with a local run directory on a Ray
    started here, RUN/logs/ray links to Ray's session logs."""
    if verbose():
        return "Ray's own output is shown as it comes (--verbose)"
    where = RAY_LOGS if _started_here else f"{RAY_LOGS} on the head node (or `ray logs`)"
    if run_dir and "://" not in run_dir and _started_here and os.path.isdir(RAY_LOGS):
        link = os.path.join(run_dir, "logs", "ray")
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.realpath(RAY_LOGS), link)  # this session's folder, not the moving "latest"
        where = f"{link} ({os.path.realpath(RAY_LOGS)})"
    return (
        f"Ray's own output (worker logs, Ray Data's progress in ray-data.log): {where}; "
        "`iterit --verbose` prints it here"
    )


def is_local() -> bool:
    return _started_here


def resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def _short(msg: str, fix: str, log) -> None:
    """A request the cluster cannot meet: an error on a Ray started here, else a warning (an autoscaler
    may still add the nodes)."""
    if is_local():
        raise IteritError(f"{msg}: {fix}")
    log(f"warning: {msg}; waiting until the autoscaler adds them")


def scoring_gpus(sc) -> float:
    """GPUs per scoring (or generation) actor: scoring.gpus_per_actor, else 1 when the cluster has GPUs."""
    if sc.gpus_per_actor is not None:
        return sc.gpus_per_actor
    return 1.0 if resources().get("GPU", 0) > 0 else 0.0


def check_pool_fits(sc, gpus: float, log=print, extra_cpus: float = 0.0) -> None:
    """The pool's minimum plus Ray Data's read task must fit the cluster, or Ray Data waits forever.
    `extra_cpus`: what else the pipeline holds for its life (Ray Data's checkpoint filter on a resume)."""
    have = resources()
    # Ray Data's file listing task takes 1 CPU whatever the config says; reads and templating take
    # template_cpus. Both must fit beside the actors, which hold their CPUs for life.
    io_cpus = max(1.0, sc.template_cpus) + extra_cpus
    need_cpu = sc.min_actors * sc.cpus_per_actor + io_cpus
    need_gpu = sc.min_actors * gpus
    for res, amount in (sc.resources_per_actor or {}).items():
        need, got = sc.min_actors * amount, have.get(res, 0)
        if need > got:
            _short(
                f"scoring needs {need:g} {res} ({sc.min_actors} actors x {amount:g}); "
                f"the cluster has {got:g}",
                "lower scoring.min_actors or scoring.resources_per_actor, or add nodes with that resource",
                log,
            )
    if have.get("CPU", 0) >= need_cpu and have.get("GPU", 0) >= need_gpu:
        return
    _short(
        f"scoring needs {need_cpu:g} CPUs ({sc.min_actors} actors x {sc.cpus_per_actor:g} + {io_cpus:g} for "
        f"reading and templating{' and the resume filter' if extra_cpus else ''}) and {need_gpu:g} GPUs; "
        f"the cluster has {have.get('CPU', 0):g} CPUs and "
        f"{have.get('GPU', 0):g} GPUs",
        "lower scoring.min_actors or scoring.cpus_per_actor (on one machine: cpus_per_actor=1 and "
        "torch_threads=<cores>)",
        log,
    )


def use_gpu(flag: bool | None) -> bool:
    """Train on GPUs: the config's use_gpu, else yes when the cluster has any."""
    return flag if flag is not None else resources().get("GPU", 0) > 0


def worker_resources(per_worker: dict[str, float] | None, gpu: bool) -> dict[str, float]:
    """Ray resources of one training worker: the config's, else 1 GPU (on GPUs) or 1 CPU."""
    return per_worker or ({"GPU": 1} if gpu else {"CPU": 1})


def check_training_fits(workers: int, per_worker: dict[str, float], want_gpu: bool | None, log=print) -> None:
    have = resources()
    for res, amount in per_worker.items():
        need, got = amount * workers, have.get(res, 0)
        if need > got:
            _short(
                f"training needs {need:g} {res} ({workers} workers x {amount:g}); the cluster has {got:g}",
                "lower ray_num_workers or resources_per_worker",
                log,
            )
    if want_gpu and not have.get("GPU"):
        log("warning: use_gpu is true but the cluster has no GPU yet")


def absolute(path: str) -> str:
    """A path as every node and worker must see it: URIs as they are, local paths made absolute (Ray
    workers run in other directories, on other nodes)."""
    return path if "://" in path else os.path.abspath(path)


def check_shared_storage(paths: list[str]) -> None:
    """Every alive node must see local paths (workers write checkpoints, models and metrics there):
    a multi-node cluster needs them on shared storage (NFS at the same path) or an s3:// / gs:// URI."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = [p for p in paths if "://" not in p]
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if not local or len(nodes) < 2:
        return
    markers = [os.path.join(p, f".iterit-visible-{os.getpid()}") for p in local]
    for p, m in zip(local, markers):
        os.makedirs(p, exist_ok=True)
        with open(m, "w") as f:
            f.write("ok")

    exists = ray.remote(num_cpus=0)(_exists)
    try:
        # Keyed by node id: nodes can share an address (several raylets on one machine, containers).
        checks = {
            (n["NodeManagerAddress"], n["NodeID"]): exists.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(markers)
            for n in nodes
        }
        checks = {node: ray.get(ref) for node, ref in checks.items()}
    finally:
        for m in markers:
            os.remove(m)
    for (address, node_id), seen in checks.items():
        for p, ok in zip(local, seen):
            if not ok:
                raise IteritError(
                    f"{p} is not visible from node {address} ({node_id[:12]}): multi-node training writes "
                    "checkpoints and models there from every node; put output_dir / storage_path on shared "
                    "storage (NFS mounted at the same path on every node) or an s3:// / gs:// URI"
                )


def _exists(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def gpu_memory_bytes(timeout_s: float = 60.0) -> int | None:
    """Total memory of one of the cluster's GPUs, read by a task on a sliver of one (no CPU, 1% of a
    GPU: it runs beside anything); None when no GPU takes it within `timeout_s` (an autoscaler still
    adding GPU nodes, every GPU held whole)."""
    import ray

    ref = ray.remote(num_cpus=0, num_gpus=0.01)(_gpu_total_memory).remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None


def _gpu_total_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory
