"""benchmarks/bench_gpu.py --smoke: the GPU check's own code path on CPU, so it cannot rot before a GPU
meets it. Run as the GPU machine runs it: a plain checkout, with Ray, DeepSpeed and pydantic not
importable (that machine has torch, transformers and numpy only)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_gpu.py")

# Runs the script with those packages absent: a None in sys.modules makes `import ray` fail and
# importlib.util.find_spec("ray") (what transformers checks before it imports deepspeed) say None.
WITHOUT_CLUSTER_PACKAGES = """
import runpy, sys
for name in ("ray", "deepspeed", "pydantic"):
    sys.modules[name] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_smoke_runs_every_measurement_on_cpu_without_cluster_packages(tmp_path):
    out = tmp_path / "gpu.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_CLUSTER_PACKAGES, SCRIPT, "--smoke", "--out", str(out)],
        cwd=tmp_path,  # not the checkout: the script finds its own package
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by = {}
    for r in records:
        by.setdefault(r["measure"], []).append(r)
    assert sorted(by) == ["exact", "gemm", "oom", "ranking", "score", "total", "train"]

    assert {r["dtype"] for r in by["gemm"]} == {"bfloat16", "float32"} and all(
        r["tflops"] > 0 for r in by["gemm"]
    )
    exact = by["exact"][0]
    assert exact["ok"] and exact["max_relative_ifd_difference"] <= 1e-4 and exact["samples"] == 32
    scores = {(r["shape"], r["dtype"]) for r in by["score"]}
    assert scores == {("llama-3.2-1b", "float32"), ("llama-3.2-1b", "bfloat16"), ("llama-3-8b", "bfloat16")}
    for r in by["score"]:
        assert r["tokens_per_s"] > 0 and r["model_gflop_per_token"] > 0 and 0 <= r["padding"] < 1
    assert by["ranking"][0]["spearman"] > 0.9  # bf16 against fp32 on the same weights
    oom = by["oom"][0]
    assert (
        oom["halvings"] > 0
        and oom["all_scored"]
        and oom["max_relative_ifd_difference_vs_fitting_budget"] < 1e-3
    )
    off, on = by["train"]
    assert (off["activation_checkpointing"], on["activation_checkpointing"]) == (False, True)
    assert off["finite"] and on["finite"] and on["max_loss_difference_vs_off"] < 1e-3
    assert off["losses"][0] == on["losses"][0]  # the same weights and batch: the first loss is bit-equal

    table = run.stdout[run.stdout.index("measure  shape") :].splitlines()
    assert len(table) == 1 + len(records)  # a header, then one line per measurement
