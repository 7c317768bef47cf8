"""Ray nodes on this machine for the multi-node tests: each node a `ray start --block` process in its
own process group, on free ports, under one short temp dir, and stopped by pid.

Not ray.cluster_utils.Cluster: the pytest process already runs the session's local Ray (ray_local),
and a process can join only one Ray. Not `ray stop` either: it stops every Ray on the machine, the
session's own included. iterit runs against these nodes in a subprocess with RAY_ADDRESS set; the
test process reads placement from the head's state API over HTTP.

Each node carries a custom resource named after it ({"node_b": 1}): work can be pinned to a node by
it, the node is found in Ray's state by it, and its raylet (whose command line lists the node's
resources) is found by it to be killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
FAKE_CLUSTER_BASE = Path(__file__).parent / "data" / "fake_multinode.yaml"

ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # The GCS marks a node whose raylet died after failure_threshold missed checks of period_ms:
    # ~1.5 s here instead of Ray's ~30 s, so a lost node is rescheduled around within a test.
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    # A raylet gives its dashboard agent this long to come up before it aborts: Ray's default is too
    # short on 2 busy cores running several nodes.
    "RAY_agent_register_timeout_ms": "120000",
    # A training worker group restarted after a lost node waits for the node that replaces it.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what: str, check, timeout: float = 120.0, every: float = 0.2):
    """Poll `check()` until it returns something truthy; that value. Fails with `what` on timeout."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)


def _static_resources(cmdline) -> list[str]:
    """The resource names a raylet was started with: `--static_resource_list=name,amount,...`."""
    for arg in cmdline:
        if arg.startswith("--static_resource_list="):
            return arg.split("=", 1)[1].split(",")[::2]
    return []


class Cluster:
    """A head and any number of nodes on this machine. `env` is what every node and every driver run
    against them needs (RAY_ADDRESS included once the head is up)."""

    def __init__(self):
        # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
        self.temp = tempfile.mkdtemp(prefix="itmn-", dir="/tmp")
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, **ENV}
        self.env.pop("RAY_ADDRESS", None)
        self.address = self.dashboard = ""

    def _start(self, name: str, args: list[str], wrap: list[str], env: dict) -> None:
        # Every default port of a node moves to a free one: the session's Ray and the other nodes
        # of this machine hold the fixed defaults.
        ports = [
            f"--{p}={free_port()}"
            for p in (
                "node-manager-port",
                "object-manager-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        ]
        log = open(os.path.join(self.temp, f"{name}.log"), "wb")
        self.procs[name] = subprocess.Popen(
            [*wrap, RAY, "start", "--block", "--disable-usage-stats", "--num-gpus=0", *ports, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_head(self, name: str, cpus: int, resources: dict | None = None, autoscale: dict | None = None):
        """The head (GCS, dashboard for the state API) with `cpus` CPUs and {name: 1} besides
        `resources`. `autoscale`: worker node types for Ray's fake multi-node autoscaler, which then
        starts and stops nodes on this machine as the load asks (tests/data/fake_multinode.yaml)."""
        port, dash = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        # Every process of these nodes, and every driver, joins this cluster: with several Rays on the
        # machine, Ray's own address lookup (Ray Train's state queries) would find more than one.
        self.env["RAY_ADDRESS"] = self.address
        res = {name: 1, **(resources or {})}
        extra, env = [], self.env
        if autoscale is not None:
            import yaml

            config = yaml.safe_load(FAKE_CLUSTER_BASE.read_text())
            head = {"resources": {"CPU": cpus, **res}, "node_config": {}, "max_workers": 0}
            config["available_node_types"] = {"ray.head.default": head, **autoscale}
            config["provider"]["gcs_address"] = f"127.0.0.1:{port}"  # not the default port 6379
            config["idle_timeout_minutes"] = 1  # no node is stopped while a test still looks at it
            path = os.path.join(self.temp, "autoscaling.yaml")
            Path(path).write_text(yaml.safe_dump(config))
            extra = [f"--autoscaling-config={path}"]
            env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self._start(
            name,
            [
                "--head",
                f"--port={port}",
                f"--temp-dir={self.temp}",
                f"--num-cpus={cpus}",
                f"--resources={json.dumps(res)}",
                "--object-store-memory=200000000",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={free_port()}",
                *extra,
            ],
            [],
            env,
        )
        until("the head's state API", lambda: self.node_id(name))

    def add_node(self, name: str, cpus: int, resources: dict | None = None, wrap: list[str] = ()) -> str:
        """A node joined to the head, with {name: 1} besides `resources`; its node id once alive.
        `wrap`: a command the node's `ray start` runs under (a private mount namespace)."""
        self._start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={cpus}",
                f"--resources={json.dumps({name: 1, **(resources or {})})}",
                "--object-store-memory=200000000",
            ],
            list(wrap),
            self.env,
        )
        return until(f"node {name} to join", lambda: self.node_id(name))

    def nodes(self) -> list:
        """Every node the head's state API knows, alive or dead (none while its dashboard starts)."""
        from ray.util.state import list_nodes

        try:
            return list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False)
        except Exception:  # the dashboard is still starting
            return []

    def node_id(self, name: str, state: str = "ALIVE") -> str | None:
        """The id of the node that carries resource `name`, in `state` (None if there is none)."""
        for n in self.nodes():
            if name in (n.resources_total or {}) and n.state == state:
                return n.node_id
        return None

    def alive(self) -> dict[str, str]:
        """Alive node id -> the name of the resource that marks it (the head's "" when it has none)."""
        names = set(self.procs)
        return {
            n.node_id: next((r for r in n.resources_total or {} if r in names), "")
            for n in self.nodes()
            if n.state == "ALIVE"
        }

    def kill(self, name: str, when=None) -> None:
        """Lose node `name` as a crashed machine would: SIGKILL its raylet (its workers exit with it)
        as soon as `when()` holds (polled every 50 ms; the raylet is found beforehand, so the kill
        lands at once), then wait until the GCS has marked the node dead."""
        import psutil

        node_id = self.node_id(name)
        raylets = [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "raylet" and name in _static_resources(p.info["cmdline"] or ())
        ]
        assert node_id and len(raylets) == 1, f"expected one raylet of node {name}, found {len(raylets)}"
        if when is not None:
            until(f"the moment to kill node {name}", when, timeout=300, every=0.05)
        raylets[0].kill()
        until(f"node {name} to be marked dead", lambda: self.node_id(name, "DEAD") == node_id)

    def actors(self, class_name: str) -> list:
        """Every actor of the cluster (alive or dead) whose class name contains `class_name`."""
        from ray.util.state import list_actors

        return [
            a
            for a in list_actors(
                address=self.dashboard, detail=True, limit=10_000, raise_on_missing_output=False
            )
            if class_name in a.class_name
        ]

    def stop(self) -> None:
        """Every process of these nodes: each `ray start` process group, then whatever still names
        the temp dir on its command line (workers, agents, autoscaled nodes)."""
        import psutil

        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp in arg for arg in p.info["cmdline"] or ()):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(self.temp, ignore_errors=True)
