"""Deployment files: the paper's configs validate and carry the paper's numbers, and the KubeRay RayJob
is consistent with the repository (entrypoint, config, Ray version) and holds no secrets.

Fast and offline: no Ray start, no network, no Kubernetes. The KubeRay CRD schema is not available
offline, so the RayJob gets structural checks of the fields KubeRay reads."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from iterit.config import load_config

ROOT = Path(__file__).parent.parent
PAPER_CONFIGS = {
    "configs/llama3-8b-alpaca.yaml": "meta-llama/Meta-Llama-3-8B",
    "configs/qwen2.5-7b-alpaca.yaml": "Qwen/Qwen2.5-7B",
}
RAYJOB = ROOT / "k8s" / "rayjob.yaml"


# --------------------------------------------------------------------------------------------
# The paper's configs (IterIT, arXiv 2412.17365)


@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
def test_paper_config_validates_with_the_papers_numbers(path):
    cfg = load_config(ROOT / path)  # raises IteritError on an unknown key or a bad value
    assert cfg.base_model == PAPER_CONFIGS[path]
    sel = cfg.selection
    assert (sel.method, sel.ratio, sel.update_ratio, sel.decay) == ("iterit", 0.05, 3, 0.1)
    assert sel.num_selected(52_002) == 2_600 and sel.window(52_002) == 7_800  # Alpaca-52K: k, W
    assert cfg.iterations == 3 and cfg.seed == 42 and cfg.sequence_len == 2048
    assert cfg.learning_rate == pytest.approx(2e-5)
    assert cfg.lr_scheduler == "cosine" and cfg.warmup_ratio == pytest.approx(0.03)
    assert cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.ray_num_workers == 32  # global batch
    assert cfg.ray_num_workers == 8 and cfg.resources_per_worker == {"CPU": 8, "GPU": 1}
    assert cfg.deepspeed == 3 and cfg.bf16 is True and cfg.lora_r is None
    # Autoscaling from zero: "auto" would read a GPU-less cluster at start and pick CPU.
    assert cfg.use_gpu is True and cfg.scoring.gpus_per_actor == 1
    sc = cfg.scoring
    assert (sc.dtype, sc.min_actors, sc.max_actors, sc.token_budget, sc.batch_size) == (
        "bfloat16",
        1,
        8,
        16384,
        512,
    )
    assert sc.max_actors * sc.gpus_per_actor <= 8  # the scoring pool fits one 8-GPU node
    # Multi-node: every node reads the data and writes the run directory and checkpoints.
    assert [d.type for d in cfg.datasets] == ["alpaca"]
    for where in [d.path for d in cfg.datasets] + [cfg.output_dir, cfg.storage_path]:
        assert where.startswith("s3://"), where


def test_paper_configs_differ_only_in_model_and_paths():
    a, b = (load_config(ROOT / p).model_dump() for p in sorted(PAPER_CONFIGS))
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"base_model", "output_dir", "storage_path"}


# --------------------------------------------------------------------------------------------
# k8s/rayjob.yaml


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d is not None]
    assert len(docs) == 1, "k8s/rayjob.yaml holds exactly one RayJob"
    return docs[0]


def _cluster_ray_version() -> str:
    image = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", image)
    assert m, f"cluster.yaml image {image!r} is not a rayproject/ray GPU tag"
    return m.group(1)


def _containers(rayjob: dict) -> dict[str, dict]:
    """Every Ray container by group: 'head' and each worker group's name."""
    spec = rayjob["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for g in spec["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]["spec"]["containers"]
    assert all(len(cs) >= 1 for cs in out.values())
    return {group: cs[0] for group, cs in out.items()}  # KubeRay runs Ray in the first container


def test_rayjob_is_a_kuberay_v1_rayjob(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])  # a DNS-1123 label
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("backoffLimit", 0) == 0  # a retry would be a fresh run against the same output_dir


def test_rayjob_entrypoint_runs_a_config_of_this_repo(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "ray_jobs/run.py"], argv
    assert "--config" in argv, argv
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"entrypoint config {config} is not in the repository"
    assert config in PAPER_CONFIGS
    load_config(ROOT / config)  # and it validates


def test_rayjob_entrypoint_script_exists():
    script = ROOT / "ray_jobs" / "run.py"
    assert '"run"' in script.read_text(), "ray_jobs/run.py should call the CLI's run command"


def test_rayjob_runtime_env_ships_code_and_installs_the_package(rayjob):
    from ray.runtime_env import RuntimeEnv  # import only: Ray's own runtime-env parser, no Ray start

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # raises on an unknown field or a malformed pip / working_dir
    # The submitter pod has no checkout: working_dir must be a URI every node can fetch.
    assert re.match(r"(https|s3|gs)://", env["working_dir"]) and env["working_dir"].endswith(".zip")
    pip = env["pip"] if isinstance(env["pip"], list) else env["pip"]["packages"]
    assert any(re.match(r"iterit\[s3\]\s*@\s*https://", p) for p in pip), pip  # as cluster.yaml: iterit[s3]


def test_rayjob_ray_versions_agree(rayjob):
    """One Ray version everywhere: rayVersion, every image, cluster.yaml's image, and any pins."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    version = _cluster_ray_version()
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == version
    for group, c in _containers(rayjob).items():
        assert c["image"] == f"rayproject/ray:{version}-py311-gpu", (group, c["image"])
    # pyproject's `ray` requirement (a floor, or a pin) must admit that version...
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_reqs = [r for r in map(Requirement, deps) if r.name == "ray"]
    assert ray_reqs and all(r.specifier.contains(Version(version)) for r in ray_reqs), ray_reqs
    # ...and so must any ray requirement in the job's runtime env (which would otherwise reinstall Ray).
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    pip = env.get("pip", [])
    for req in map(Requirement, pip if isinstance(pip, list) else pip["packages"]):
        if req.name == "ray":
            assert req.specifier.contains(Version(version)), req


def test_rayjob_autoscales_gpu_workers_from_zero(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    assert float(head["rayStartParams"]["num-cpus"]) <= 2  # the head is no scoring / training node
    head_res = _containers(rayjob)["head"]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert 0 == g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits["nvidia.com/gpu"])
        assert gpus >= 1 and "cpu" in limits and "memory" in limits
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), g["groupName"]
    # The paper's configs fit: 8 training workers x {CPU: 8, GPU: 1} on one node's limits.
    g = groups[0]
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    cfg = load_config(ROOT / "configs/llama3-8b-alpaca.yaml")
    per_node = int(limits["nvidia.com/gpu"])
    assert cfg.ray_num_workers * cfg.resources_per_worker["GPU"] <= per_node * g["maxReplicas"]
    workers_per_node = per_node // cfg.resources_per_worker["GPU"]
    assert workers_per_node * cfg.resources_per_worker["CPU"] <= float(limits["cpu"])


# --------------------------------------------------------------------------------------------
# No secrets in the manifest

CREDENTIAL_NAME = re.compile(
    r"secret|password|passwd|token|credential|(^|_)key($|_)|access_?key|api_?key", re.I
)
REFERENCE_FIELDS = {"secretRef", "secretKeyRef", "secretName", "serviceAccountName"}  # names of Secrets
CREDENTIAL_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|-----BEGIN [A-Z ]*PRIVATE KEY"
)


def literal_secrets(node, where: str = "") -> list[str]:
    """Places where a credential-like name carries a literal value instead of a Secret reference."""
    found = []
    if isinstance(node, dict):
        # A container env entry: {name: AWS_SECRET_ACCESS_KEY, value: ...} (valueFrom is fine).
        if isinstance(node.get("name"), str) and "value" in node and CREDENTIAL_NAME.search(node["name"]):
            found.append(f"{where}: env {node['name']} has a literal value")
        for key, value in node.items():
            path = f"{where}.{key}"
            if key == "runtimeEnvYAML" and isinstance(value, str):
                found += literal_secrets(yaml.safe_load(value), path)
            elif isinstance(value, (dict, list)):
                found += literal_secrets(value, path)
            elif (
                key not in REFERENCE_FIELDS
                and key != "key"
                and CREDENTIAL_NAME.search(str(key))
                and value not in (None, "")
            ):
                found.append(f"{path}: literal value")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, f"{where}[{i}]")
    return found


def test_rayjob_has_no_literal_secrets(rayjob):
    assert literal_secrets(rayjob) == []
    assert not CREDENTIAL_VALUE.search(RAYJOB.read_text())
    # Credentials reach every Ray container only through a Secret reference.
    for group, c in _containers(rayjob).items():
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert "aws-credentials" in refs, group
        assert not any(CREDENTIAL_NAME.search(e["name"]) for e in c.get("env", []) if "value" in e), group


def test_the_secret_check_catches_inline_credentials(rayjob):
    import copy

    bad = copy.deepcopy(rayjob)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head.setdefault("env", []).append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})
    bad["spec"]["runtimeEnvYAML"] += "env_vars:\n  HF_TOKEN: xyz\n"
    found = literal_secrets(bad)
    assert (
        len(found) == 2
        and any("AWS_SECRET_ACCESS_KEY" in f for f in found)
        and any("HF_TOKEN" in f for f in found)
    )
    # Tolerations' `key` and Secret names are not credentials.
    assert (
        literal_secrets(
            {"tolerations": [{"key": "nvidia.com/gpu"}], "secretRef": {"name": "aws-credentials"}}
        )
        == []
    )
