"""iterit on two (or autoscaled) Ray nodes on this machine: placement, equal numbers, a lost node,
storage a node cannot see, and a scoring pool that grows with the cluster.

The nodes are `ray start` processes (tests/multinode_cluster.py), one cluster shared by the module;
iterit runs against them in a subprocess with RAY_ADDRESS set, as `ray job submit` would run it.
Placement is read from the head's state API (actors with their node ids), never assumed. Each node
has {"slot": 1}: two training workers or two scoring actors asking for a slot each land one per node.
The training test that kills a node replaces it with a fresh one (what an autoscaler or operator
does): the restarted worker group needs two slots again. Run them with `pytest -m multinode`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import WORDS
from multinode_cluster import Cluster

from iterit.rundir import iter_scores, read_scores

pytestmark = pytest.mark.multinode

TRAINER = "RayTrainWorker"
SCORER = "MapBatches(Scorer)"
# One fit of iterit's training stage against RAY_ADDRESS: CONFIG SUBSETS_JSON SAMPLES K RESULT_JSON.
# Its result goes to a file, not stdout: Ray's log monitor shares the driver's stdout, and a CI run once
# lost the printed line there.
FIT = """
import json, sys
from iterit import cluster
from iterit.config import load_config
from iterit.training.trainer import train
cfg = load_config(sys.argv[1])
cluster.connect()
subsets = {int(e): ids for e, ids in json.loads(sys.argv[2]).items()}
out = train(cfg, cfg.output_dir, subsets, sys.argv[3], k=int(sys.argv[4]), name="fit")
with open(sys.argv[5], "w") as f:
    json.dump(out, f)
"""


def write_corpus(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = [
        {
            "id": f"m{i}",
            "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture()
def python():
    """`python ARGS` against a cluster (`-m iterit ...`, `-c FIT ...`), its output in a log file (a pipe
    could fill and block it); any still running when the test ends is killed."""
    started = []

    def start(cluster: Cluster, args: list, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, *map(str, args)], env=cluster.env, stdout=out, stderr=subprocess.STDOUT
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(proc: subprocess.Popen, log: Path, timeout: float = 540) -> str:
    """Wait for the driver; its output, which the assertion shows if it failed."""
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def scoring_tree(model: str, corpus: Path, tmp_path: Path, **scoring) -> dict:
    """The config keys of a scoring test: the tiny settings, with `scoring` keys (the pool) on top."""
    return {
        "base_model": model,
        "datasets": [{"path": str(corpus)}],
        "output_dir": str(tmp_path / "unused"),
        "sequence_len": 64,
        "scoring": {"torch_threads": 1, "batch_size": 8, "template_cpus": 0.5, **scoring},
    }


def scored_ids(out: Path) -> list[str]:
    return [
        i
        for t in iter_scores(str(out / "scores"), ["id"], scored_only=False)
        for i in t.column("id").to_pylist()
    ]


def placement(cluster: Cluster, class_name: str, before: set[str] = frozenset()) -> dict[str, str]:
    """Actor id -> node id of the actors of `class_name` the cluster has seen, less `before`."""
    return {a.actor_id: a.node_id for a in cluster.actors(class_name) if a.actor_id not in before}


@pytest.fixture(scope="module")
def two_nodes():
    """A head (node_a) and a second node (node_b), 2 CPUs and {"slot": 1} each."""
    cluster = Cluster()
    try:
        cluster.start_head("node_a", cpus=2, resources={"slot": 1})
        cluster.add_node("node_b", cpus=2, resources={"slot": 1})
        cluster.second = "node_b"  # the node the kill tests lose; replaced by node_c, node_d, ...
        yield cluster
    finally:
        cluster.stop()


def lose_second_node(cluster: Cluster, when) -> tuple[str, str]:
    """Kill the second node's raylet once `when()` holds, then start a replacement with the same
    resources: the lost node's id and the replacement's."""
    lost = cluster.node_id(cluster.second)
    cluster.kill(cluster.second, when)
    cluster.second = f"node_{chr(ord(cluster.second[-1]) + 1)}"
    return lost, cluster.add_node(cluster.second, cpus=2, resources={"slot": 1})


def while_running(proc: subprocess.Popen, log: Path, check):
    """`check`, for polling while the driver runs: a driver that exited fails at once, with its output."""

    def poll():
        assert proc.poll() is None, (
            f"the driver exited ({proc.returncode}) too early:\n{log.read_text()[-4000:]}"
        )
        return check()

    return poll


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("mn_corpus") / "corpus.jsonl", 60, seed=21)


# --------------------------------------------------------------------------------------------
# Placement and equal numbers


def result(path: Path, log: Path) -> dict:
    """What FIT wrote: train()'s result (the driver's output if it wrote none)."""
    assert path.exists(), f"the driver exited without a result:\n{log.read_text()[-4000:]}"
    return json.loads(path.read_text())


def test_zero3_with_one_worker_per_node_equals_one_node(zero3_fit, two_nodes, train_corpus, tmp_path, python):
    """2 ZeRO-3 workers pinned one per node by their slot: the same losses and learning rates, step by
    step, as the session's zero3_fit (the same config, 2 workers on the one-node Ray; fp32, CPU, gloo)."""
    from iterit.training.trainer import read_metrics

    samples, subsets = train_corpus
    before = set(placement(two_nodes, TRAINER))
    tree = {
        **zero3_fit["tree"],
        "output_dir": str(tmp_path / "two"),
        "resources_per_worker": {"CPU": 1, "slot": 1},
    }
    config = write_config(tmp_path / "two.yaml", tree)
    log = tmp_path / "two.log"
    args = ["-c", FIT, config, json.dumps({0: subsets[0]}), samples, 16, tmp_path / "two.json"]
    finished(python(two_nodes, args, log), log)

    workers = placement(two_nodes, TRAINER, before)
    assert len(workers) == 2 and set(workers.values()) == set(two_nodes.alive())  # one on each node
    a, b = zero3_fit["metrics"], read_metrics(str(tmp_path / "two"), 0)
    assert [m["step"] for m in a] == [1, 2] == [m["step"] for m in b]
    assert [m["lr"] for m in b] == pytest.approx([m["lr"] for m in a], abs=1e-12)
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], abs=1e-6)
    assert [m["tokens"] for m in b] == [m["tokens"] for m in a]


def test_scoring_with_one_actor_per_node(ray_local, two_nodes, tiny_model_dir, corpus, tmp_path, cli, python):
    """2 scoring actors, a slot each (scoring.resources_per_actor): one per node, every id scored once,
    the same numbers as one actor on the session's one-node Ray."""
    tree = scoring_tree(tiny_model_dir, corpus, tmp_path, min_actors=2, max_actors=2)
    pinned = {**tree, "scoring": {**tree["scoring"], "resources_per_actor": {"slot": 1}}}
    before = set(placement(two_nodes, SCORER))
    log = tmp_path / "score.log"
    finished(
        python(
            two_nodes,
            [
                "-m",
                "iterit",
                "score",
                "--config",
                write_config(tmp_path / "two.yaml", pinned),
                "--output",
                tmp_path / "two",
            ],
            log,
        ),
        log,
    )

    actors = placement(two_nodes, SCORER, before)
    assert len(actors) == 2 and set(actors.values()) == set(two_nodes.alive())
    ids = scored_ids(tmp_path / "two")
    assert len(ids) == len(set(ids)) == 60

    single = {**tree, "scoring": {**tree["scoring"], "min_actors": 1, "max_actors": 1}}
    code, _, err = cli(
        ["score", "--config", write_config(tmp_path / "one.yaml", single), "--output", tmp_path / "one"]
    )
    assert code == 0, err
    cols = ["id", "ifd", "loss_cond", "loss_prior"]
    one = {r["id"]: r for r in read_scores(str(tmp_path / "one" / "scores"), cols).to_pylist()}
    two = read_scores(str(tmp_path / "two" / "scores"), cols).to_pylist()
    assert len(two) == len(one) == 60
    for r in two:
        for k in cols[1:]:
            assert r[k] == pytest.approx(one[r["id"]][k], rel=1e-6, abs=1e-9)


def test_a_run_with_a_proxy_on_two_nodes_picks_as_one_node(
    ray_local, two_nodes, tiny_run_config, loop_corpus, tiny_proxy_dir, proxy_uninterrupted, tmp_path, python
):
    """Iteration 0 with scoring.proxy_model, a scoring actor on each node for both passes (the proxy's over
    all N, the base model's over the window): every id once in each, the picks of the one-node run."""
    from conftest import proxy_tree

    tree = proxy_tree(tiny_run_config, loop_corpus, tmp_path / "run", tiny_proxy_dir, iterations=1)
    tree["scoring"] = {
        **tree["scoring"],
        "min_actors": 2,
        "max_actors": 2,
        "resources_per_actor": {"slot": 1},
    }
    before = set(placement(two_nodes, SCORER))
    log = tmp_path / "run.log"
    finished(
        python(two_nodes, ["-m", "iterit", "run", write_config(tmp_path / "proxy.yaml", tree)], log), log
    )
    # The proxy pass's 60 rows are 4 blocks (batch_size 16), one actor's work on each node; the window's
    # 12 rows are one block, so its second actor may end unplaced (node None) when the pass is done.
    actors = placement(two_nodes, SCORER, before)
    placed = {node for node in actors.values() if node is not None}
    assert placed == set(two_nodes.alive()), actors
    proxy_ids = scored_ids(tmp_path / "run" / "iter_0" / "proxy")
    assert len(proxy_ids) == len(set(proxy_ids)) == 60
    window = scored_ids(tmp_path / "run" / "iter_0")
    assert len(window) == len(set(window)) == 12  # W = k x update_ratio = 6 x 2
    local = proxy_uninterrupted[0] / "iter_0" / "selection.jsonl"
    picks = [json.loads(line)["id"] for line in open(tmp_path / "run" / "iter_0" / "selection.jsonl")]
    assert picks == [json.loads(line)["id"] for line in open(local)]


# --------------------------------------------------------------------------------------------
# Storage a node cannot see


def test_a_node_that_cannot_see_the_run_directory_fails_the_preflight(
    two_nodes, tiny_run_config, corpus, tmp_path
):
    """A third node started in a private mount namespace with an empty tmpfs over the run directory's
    parent: the marker the driver writes is not there, and `iterit run` stops before any work with
    check_shared_storage's one line naming the path and that node."""
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace needs root")
    runs = tmp_path / "runs"
    runs.mkdir()
    blind = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs blind "$0" && exec "$@"',
        str(runs),
    ]
    node_id = two_nodes.add_node("node_blind", cpus=1, wrap=blind)
    try:
        config = write_config(tmp_path / "run.yaml", tiny_run_config(corpus, runs / "run"))
        r = subprocess.run(
            [sys.executable, "-m", "iterit", "run", str(config)],
            env=two_nodes.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        two_nodes.kill("node_blind")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {runs / 'run' / 'checkpoints'} is not visible from node "
        f"{next(n.node_ip for n in two_nodes.nodes() if n.node_id == node_id)} ({node_id[:12]}): "
        "multi-node training writes checkpoints and models there from every node; put output_dir / "
        "storage_path on shared storage (NFS mounted at the same path on every node) or an s3:// / gs:// URI"
    ]
    assert "Traceback" not in r.stderr
    assert not (runs / "run" / "ingest").exists()  # before any work
    assert not list((runs / "run").rglob(".iterit-visible-*"))  # its markers are cleaned up


# --------------------------------------------------------------------------------------------
# A lost node


def test_training_goes_on_when_a_node_is_lost(zero3_fit, two_nodes, train_corpus, tmp_path, python):
    """A 2-worker ZeRO-3 fit, one worker per node, a checkpoint every step: once the first checkpoint is
    written, the second node's raylet is killed. Ray Train restarts the worker group from the last
    checkpoint (FailureConfig) on the node that replaced it, and the fit reaches its planned 20 steps
    (40 samples / 2 workers / micro-batch 1), each once. (At 10 steps CI once finished the fit before
    the killed node's worker had exited: no restart to see.)"""
    samples, subsets = train_corpus
    run_dir = tmp_path / "run"
    tree = {
        **zero3_fit["tree"],
        "output_dir": str(run_dir),
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "checkpoint_every": 1,
        "max_failures": 2,
        "resources_per_worker": {"CPU": 1, "slot": 1},
    }
    ids = [*subsets[0], *subsets[1], *subsets[2]][:40]
    before = set(placement(two_nodes, TRAINER))
    log = tmp_path / "fit.log"
    config = write_config(tmp_path / "fit.yaml", tree)
    args = ["-c", FIT, config, json.dumps({0: ids}), samples, 40, tmp_path / "fit.json"]
    proc = python(two_nodes, args, log)
    first_checkpoint = while_running(
        proc, log, lambda: list((run_dir / "checkpoints").glob("*/checkpoint_*"))
    )
    lost, replacement = lose_second_node(two_nodes, first_checkpoint)
    finished(proc, log)

    out = result(tmp_path / "fit.json", log)
    assert out["total_steps"] == 20 == out["iterations"]["0"]["steps"]
    steps = [json.loads(line)["step"] for line in open(run_dir / "iter_0" / "train_metrics.jsonl")]
    assert steps == list(range(1, 21))
    nodes = list(placement(two_nodes, TRAINER, before).values())
    assert lost in nodes and replacement in nodes  # the group lost a worker and restarted on the new node


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("mn_big") / "corpus.jsonl", 1200, seed=22)


def committed_rows(checkpoint: Path) -> int:
    """Ids Ray Data has committed in a scoring stage's id checkpoint (pending files are not yet)."""
    rows = 0
    for p in checkpoint.rglob("*.parquet") if checkpoint.exists() else []:
        if ".pending." not in p.name:
            try:
                rows += pq.ParquetFile(p).metadata.num_rows
            except FileNotFoundError:  # being renamed
                pass
    return rows


def test_scoring_goes_on_when_a_node_is_lost(two_nodes, tiny_model_dir, big_corpus, tmp_path, python):
    """1,200 rows on 2 actors, one per node: once a quarter are committed, the second node's raylet is
    killed and no node replaces it. Ray Data retries the lost actor's batches on the surviving actor:
    the stage finishes and every id is in exactly one part. (The last test on the shared two nodes: it
    leaves the head alone.)"""
    tree = scoring_tree(
        tiny_model_dir, big_corpus, tmp_path, min_actors=2, max_actors=2, resources_per_actor={"slot": 1}
    )
    out = tmp_path / "scored"
    before = set(placement(two_nodes, SCORER))
    log = tmp_path / "score.log"
    proc = python(
        two_nodes,
        ["-m", "iterit", "score", "--config", write_config(tmp_path / "score.yaml", tree), "--output", out],
        log,
    )
    at_kill = {}  # actor id -> node id when the node is killed (a lost actor's node is unknown after)

    def a_quarter():
        if committed_rows(out / "scores.checkpoint") < 300:
            return False
        at_kill.update(placement(two_nodes, SCORER, before))
        return True

    lost = two_nodes.node_id(two_nodes.second)
    two_nodes.kill(two_nodes.second, while_running(proc, log, a_quarter))
    assert committed_rows(out / "scores.checkpoint") < 1200  # killed mid-stage
    finished(proc, log)

    ids = scored_ids(out)
    assert len(ids) == len(set(ids)) == 1200
    summary = json.loads((out / "score_summary.json").read_text())
    assert summary["rows"] == 1200 == summary["scored"] + summary["rejected"]
    assert sorted(at_kill.values()) == sorted([lost, two_nodes.node_id("node_a")])  # one actor per node


# --------------------------------------------------------------------------------------------
# Autoscaling


@pytest.fixture(scope="module")
def heavier_model(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model's tokenizer on a wider, deeper Llama (hidden 256, 4 layers): scoring a batch
    takes long enough that the actor, not templating, is the pipeline's bottleneck, which is what
    makes Ray Data grow the pool."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("heavier_model")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.update({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4})
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


def test_scoring_pool_grows_onto_autoscaled_nodes(heavier_model, tmp_path, python):
    """Ray's fake multi-node autoscaler: a head with no CPUs, a worker node type (4 CPUs and one
    `scorer`) of at most 2 nodes, a pool of 1 to 2 actors that each ask for a scorer. The pool starts
    on the first node the autoscaler adds and grows onto a second; every id is scored once.

    Ray Data grows the pool once batches queue up in front of its actor. With 2 (logical) CPUs a node,
    the actor's CPU left reading and templating one task at a time: the queue formed late or never, and
    800 rows were scored before a second actor came up (CI failed so). With 4 the queue forms as the
    first actor starts (about 23 s in, 3 runs of 3 here), and 2,400 rows (about 65 s) leave it time."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", 2400, seed=23)
    tree = scoring_tree(
        heavier_model, corpus, tmp_path, min_actors=1, max_actors=2, resources_per_actor={"scorer": 1}
    )
    worker = {"resources": {"CPU": 4, "scorer": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}
    cluster = Cluster()
    try:
        cluster.start_head("head", cpus=0, autoscale={"cpu_node": worker})
        head = cluster.node_id("head")
        log = tmp_path / "score.log"
        said = finished(
            python(
                cluster,
                [
                    "-m",
                    "iterit",
                    "score",
                    "--config",
                    write_config(tmp_path / "s.yaml", tree),
                    "--output",
                    tmp_path / "out",
                ],
                log,
            ),
            log,
        )
        actors = placement(cluster, SCORER)
    finally:
        cluster.stop()
    assert "waiting until the autoscaler adds them" in said  # the preflight saw no CPU and waited
    assert len(actors) == 2 and len(set(actors.values())) == 2 and head not in actors.values()
    ids = scored_ids(tmp_path / "out")
    assert len(ids) == len(set(ids)) == 2400
