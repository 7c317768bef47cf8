"""Training throughput: iterit's Ray Train + DeepSpeed fit against a plain PyTorch loop, same data and init.

    python benchmarks/bench_training.py # --samples 32 --seq-len 256 --micro 2 --accum 2 --zero 2 --threads 2
    python benchmarks/bench_training.py --model PATH --samples 64 --zero 3 --skip-2w

Data: the first demo ShareGPT conversations (ingested with iterit.data.ingest) whose response survives
--seq-len, cut there (most are cut: each micro-batch is ~seq-len x micro tokens); model: the demo
SmolLM2-135M-Instruct (fp32) or --model. Each configuration runs in its own process (so peak RSS is its own):
  (a) reference: one process, AutoModelForCausalLM fp32, torch AdamW, the same micro-batches in the same
      seeded order (iterit.training.trainer.seeded_order + collate), HF loss with num_items_in_batch =
      trained tokens of the step, the same accumulation, clipping and LR schedule
  (b) iterit.training.trainer.train on ray.init(num_cpus=2), 1 worker, DeepSpeed ZeRO --zero
  (c) the same with 2 workers under ZeRO-2, 1 CPU and torch_threads=1 each (--skip-2w leaves it out)
Steady state = the optimizer steps after the first 2 (sum tokens / sum seconds; tokens = non-pad input
tokens, as train_metrics.jsonl counts them). Fixed costs of a fit are split from the outside: a probe fit
whose loop only times imports, iterit's build_model and deepspeed.initialize (same config) gives the
worker-group start and the loop's set-up; the exported model's and the checkpoint's file times split
the tail (export, checkpoint write + Ray's copy into storage, teardown).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from pydantic import BaseModel, ConfigDict

from iterit.training.train_loop import WorkerJob

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP = 2  # optimizer steps left out of the steady state (allocator, optimizer state, data pipeline fill)


# --------------------------------------------------------------------------------------------
# Shared inputs


def prepare(model: str | None, n: int, seq_len: int, out: str) -> dict:
    """Ingest the first demo conversations into OUT/ingest/samples.parquet; the first n ids that train."""
    from iterit.config import DatasetConfig
    from iterit.data import ingest
    from iterit.demo import prepare_demo
    from iterit.errors import RowError
    from iterit.io import read_parquet
    from iterit.templates import load_tokenizer
    from iterit.training.examples import training_examples

    info = prepare_demo(log=lambda *_: None)
    model = os.path.abspath(model or info["model"])
    tok = load_tokenizer(model)
    lines = 4 * n
    while True:
        src = os.path.join(out, "train.jsonl")
        with open(info["train"], encoding="utf-8") as f, open(src, "w", encoding="utf-8") as g:
            written = 0
            for line in itertools.islice(f, lines):
                g.write(line)
                written += 1
        samples = ingest([DatasetConfig(path=src, type="sharegpt")], os.path.join(out, "ingest"))["samples"]
        table = read_parquet(samples)
        ids, msgs = table.column("id").to_pylist(), table.column("messages").to_pylist()
        ok = [
            sid for sid, ex in zip(ids, training_examples(tok, msgs, seq_len)) if not isinstance(ex, RowError)
        ]
        if len(ok) >= n or written < lines:  # enough, or the whole file is in
            return {"model": model, "samples": samples, "ids": ok[:n]}
        lines *= 2


def bench_config(args, run_dir: str, workers: int, zero: int, threads: int):
    from iterit.config import config_from_dict

    return config_from_dict(
        {
            "base_model": args.model_dir,
            "datasets": [{"path": "unused.jsonl"}],
            "output_dir": run_dir,
            "sequence_len": args.seq_len,
            "micro_batch_size": args.micro,
            "gradient_accumulation_steps": args.accum,
            "ray_num_workers": workers,
            "deepspeed": zero,
            "iterations": 1,
            "bf16": False,
            "learning_rate": args.lr,
            "checkpoint_every": 0,
            # template_cpus=0: the tokenising tasks do not hold a CPU the workers need (as in
            # tests/test_training.py)
            "scoring": {"torch_threads": threads, "template_cpus": 0},
        }
    )


class PeakRss:
    """Peak RSS of this process alone and of its whole process tree (Ray's gcs, raylet and workers are
    descendants of the driver), sampled every 0.5 s. Tree RSS counts shared pages once per process."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.tree = self.biggest = 0
        self.biggest_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.wait(0.5):
            total = 0
            for p in [self.me] + self.me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    if rss > self.biggest and p.pid != self.me.pid:
                        self.biggest, self.biggest_name = rss, p.name()
                except psutil.Error:
                    continue
                total += rss
            self.tree = max(self.tree, total)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tree_rss_mb": self.tree / 2**20,
            "worker_rss_mb": self.biggest / 2**20,
            "worker_name": self.biggest_name,
        }


# --------------------------------------------------------------------------------------------
# (a) the plain loop


def run_reference(args, prep: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, get_scheduler

    from iterit.io import read_parquet
    from iterit.templates import load_tokenizer
    from iterit.training.examples import collate, trained_tokens, training_examples, warmup_steps
    from iterit.training.trainer import seeded_order, total_steps

    cfg = bench_config(args, "unused", 1, args.zero, args.threads)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)
    table = read_parquet(prep["samples"]).select(["id", "messages"])
    by_id = dict(zip(table.column("id").to_pylist(), table.column("messages").to_pylist()))
    order = seeded_order(prep["ids"], cfg.seed, 0)
    examples = training_examples(tok, [by_id[sid] for sid in order], cfg.sequence_len, cfg.train_on)
    micro = [
        collate(
            [x for x, _ in examples[i : i + cfg.micro_batch_size]],
            [y for _, y in examples[i : i + cfg.micro_batch_size]],
            tok.pad_token_id,
        )
        for i in range(0, len(examples), cfg.micro_batch_size)
    ]
    steps = [
        micro[i : i + cfg.gradient_accumulation_steps]
        for i in range(0, len(micro), cfg.gradient_accumulation_steps)
    ]

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        cfg.base_model, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    load_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    n_steps = total_steps(cfg, len(prep["ids"]), 1)
    sched = get_scheduler(
        cfg.lr_scheduler,
        opt,
        num_warmup_steps=warmup_steps(n_steps, cfg.warmup_ratio),
        num_training_steps=n_steps,
    )
    metrics = []
    for s, step in enumerate(steps, 1):
        t = time.perf_counter()
        n_tok = sum(trained_tokens(b["labels"]) for b in step)
        lr = sched.get_last_lr()[0]
        loss_sum = 0.0
        for b in step:
            out = model(**{k: torch.from_numpy(v) for k, v in b.items()}, num_items_in_batch=max(1, n_tok))
            # The loss is already / n_tok: the step's gradient is the token mean over its micro-batches.
            out.loss.backward()
            loss_sum += float(out.loss.detach()) * n_tok
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics.append(
            {
                "step": s,
                "lr": lr,
                "loss": loss_sum / max(1, n_tok),
                "tokens": int(sum(int(b["attention_mask"].sum()) for b in step)),
                "seconds": time.perf_counter() - t,
            }
        )
    return {
        "metrics": metrics,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "setup_s": load_s,
        "fit_s": None,
    }


# --------------------------------------------------------------------------------------------
# (b), (c) the Ray Train + DeepSpeed fit


class Probe(BaseModel):
    """The probe fit's worker config: the fit's own WorkerJob and where rank 0 writes its timings."""

    model_config = ConfigDict(extra="forbid")

    job: WorkerJob
    out: str


def probe_loop(config: dict) -> None:
    """What train_loop_per_worker does before its first batch, timed (wall clock, comparable with the
    driver): imports, build_model, deepspeed.initialize with the fit's own WorkerJob."""
    t_entry = time.time()
    probe = Probe.model_validate(config)
    import deepspeed
    import ray.train
    import torch
    from transformers import get_scheduler

    from iterit.training.train_loop import build_model

    job = probe.job
    t_import = time.time()
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    torch.manual_seed(job.seed)
    model = build_model(job, torch.float32)
    t_model = time.time()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.training.learning_rate, weight_decay=job.training.weight_decay)
    deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=opt,
        config=job.ds_config,
        lr_scheduler=lambda o: get_scheduler("cosine", o, num_warmup_steps=1, num_training_steps=10),
    )
    t_ds = time.time()
    if ray.train.get_context().get_world_rank() == 0:
        with open(probe.out, "w") as f:
            json.dump(
                {
                    "entry": t_entry,
                    "import": t_import,
                    "model": t_model,
                    "ds": t_ds,
                    "exit": time.time(),
                    "threads": torch.get_num_threads(),
                },
                f,
            )


def probe_fit(cfg, workers: int, storage: str, out: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from iterit.rundir import RunDir
    from iterit.training.trainer import worker_job

    job = worker_job(cfg, RunDir(os.path.dirname(out)), [0], k=1, gpu=False)
    trainer = TorchTrainer(
        probe_loop,
        train_loop_config=Probe(job=job, out=out).model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="probe", storage_path=storage),
    )
    t0 = time.time()
    trainer.fit()
    t_end = time.time()
    with open(out) as f:
        t = json.load(f)
    return {
        "worker_group_s": t["entry"] - t0,
        "imports_s": t["import"] - t["entry"],
        "model_s": t["model"] - t["import"],
        "deepspeed_s": t["ds"] - t["model"],
        "teardown_s": t_end - t["exit"],
        "fit_s": t_end - t0,
        "threads": t["threads"],
    }


def newest_mtime(path: str) -> float:
    return max(
        (os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs), default=float("nan")
    )


def run_ray(args, prep: dict, workers: int, zero: int, threads: int, probe: bool) -> dict:
    import ray

    from iterit.rundir import RunDir
    from iterit.training.export import EXPORT_MARKER
    from iterit.training.trainer import read_metrics, train

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    try:
        run_dir = os.path.join(tmp, "run")
        cfg = bench_config(args, run_dir, workers, zero, threads)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        result: dict = {"ray_init_s": time.perf_counter() - t0}
        if probe:
            result["probe"] = probe_fit(
                cfg, workers, os.path.join(tmp, "probe"), os.path.join(tmp, "probe.json")
            )
        t_start = time.time()
        out = train(
            cfg,
            run_dir,
            {0: prep["ids"]},
            prep["samples"],
            k=len(prep["ids"]),
            name="bench",
            log=lambda *_: None,
        )
        t_end = time.time()
        t0 = time.perf_counter()
        ray.shutdown()
        result.update(
            shutdown_s=time.perf_counter() - t0,
            train_s=t_end - t_start,
            fit_s=out["fit_seconds"],
            metrics=read_metrics(run_dir, 0),
            t_start=t_start,
            t_end=t_end,
            export_done=os.path.getmtime(os.path.join(RunDir(run_dir).model(0), EXPORT_MARKER)),
            checkpoint_done=newest_mtime(out["checkpoint"]),
            threads=threads,
        )
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------


def run_one(args) -> dict:
    with open(args.prep) as f:
        prep = json.load(f)
    args.model_dir = prep["model"]
    rss = PeakRss()
    if args.one == "a":
        r = run_reference(args, prep)
    elif args.one == "b":
        r = run_ray(args, prep, 1, args.zero, args.threads, probe=True)
    else:
        r = run_ray(args, prep, 2, 2, 1, probe=False)
    r.update(rss.stop())
    return r


def child(config: str, args, prep_path: str) -> dict:
    cmd = [
        sys.executable,
        os.path.join(HERE, "bench_training.py"),
        "--one",
        config,
        "--prep",
        prep_path,
        "--seq-len",
        str(args.seq_len),
        "--micro",
        str(args.micro),
        "--accum",
        str(args.accum),
        "--zero",
        str(args.zero),
        "--threads",
        str(args.threads),
        "--lr",
        str(args.lr),
    ]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(args.health_check_s),
        "PYTHONWARNINGS": "ignore",
    }
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"configuration {config} failed:\n{out.stderr[-4000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t0
    return r


def steady(metrics: list[dict]) -> tuple[float, int]:
    """tokens/s over the steps after the first WARMUP, and how many steps that is."""
    m = metrics[WARMUP:] or metrics
    return sum(x["tokens"] for x in m) / sum(x["seconds"] for x in m), len(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model folder (default: the demo SmolLM2-135M-Instruct)")
    ap.add_argument("--samples", type=int, default=32, help="training samples (one epoch)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro", type=int, default=2, help="micro-batch size")
    ap.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage of (b)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of (a) and of (b)'s worker")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine, 3%% warmup)")
    ap.add_argument(
        "--health-check-s",
        type=float,
        default=0.1,
        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default is 2.0; the tests use 0.1)",
    )
    ap.add_argument("--skip-2w", action="store_true", help="leave out (c), 2 workers under ZeRO-2")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--prep", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-prep-") as tmp:
        prep = prepare(args.model, args.samples, args.seq_len, tmp)
        prep_path = os.path.join(tmp, "prep.json")
        with open(prep_path, "w") as f:
            json.dump(prep, f)
        names = {
            "a": f"(a) plain PyTorch loop, {args.threads} thr",
            "b": f"(b) Ray Train + DS ZeRO-{args.zero}, 1 wkr x {args.threads} thr",
            "c": "(c) Ray Train + DS ZeRO-2, 2 wkr x 1 thr",
        }
        res = {}
        for c in "ab" if args.skip_2w else "abc":
            res[c] = child(c, args, prep_path)

    a = res["a"]
    print(
        f"model {prep['model']}; {len(prep['ids'])} samples, seq-len {args.seq_len}, micro {args.micro} "
        f"x accum {args.accum}, fp32, AdamW lr {args.lr:g}; {sum(x['tokens'] for x in a['metrics']):,} "
        f"tokens in {len(a['metrics'])} steps (1 worker); steady state = steps {WARMUP + 1}.. ; "
        f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={args.health_check_s:g}"
    )
    print(
        f"{'':42} {'steps':>5} {'tokens/s':>9} {'x (a)':>6} {'s/step':>7} {'final loss':>10} {'threads':>7} "
        f"{'peak RSS MB':>11} {'tree RSS MB':>11}"
    )
    for c, r in res.items():
        rate, n = steady(r["metrics"])
        per_step = np.mean([x["seconds"] for x in r["metrics"][WARMUP:] or r["metrics"]])
        peak = r["peak_rss_mb"] if c == "a" else r["worker_rss_mb"]
        tree = "-" if c == "a" else f"{r['tree_rss_mb']:,.0f}"
        print(
            f"{names[c]:42} {len(r['metrics']):5} {rate:9,.1f} {rate / steady(a['metrics'])[0]:6.2f} "
            f"{per_step:7.2f} {r['metrics'][-1]['loss']:10.4f} {r['threads']:7} {peak:11,.0f} {tree:>11}"
        )
    print(
        "peak RSS: (a) the process; (b), (c) the largest Ray worker process; tree RSS: driver + Ray "
        "processes + workers (shared pages counted per process)"
    )

    b = res["b"]
    ratio = steady(b["metrics"])[0] / steady(a["metrics"])[0]
    print(
        f"(b)/(a) steady-state tokens/s: {ratio:.3f} (target >= {1 / 1.2:.3f}, i.e. within 1.2x) -> "
        f"{'met' if ratio >= 1 / 1.2 else 'NOT met'}"
    )
    common = min(len(a["metrics"]), len(b["metrics"]))
    dl = [abs(x["loss"] - y["loss"]) for x, y in zip(a["metrics"][:common], b["metrics"][:common])]
    same_tok = all(x["tokens"] == y["tokens"] for x, y in zip(a["metrics"], b["metrics"]))
    same_lr = max(abs(x["lr"] - y["lr"]) for x, y in zip(a["metrics"][:common], b["metrics"][:common]))
    print(
        f"(b) vs (a) over {common} common steps: max |loss difference| {max(dl):.2e} (step "
        f"{int(np.argmax(dl)) + 1}), same tokens per step: {'yes' if same_tok else 'NO'}, "
        f"max |lr difference| {same_lr:.1e}"
    )
    print("per-step loss (a): " + " ".join(f"{x['loss']:.4f}" for x in a["metrics"]))
    print("per-step loss (b): " + " ".join(f"{x['loss']:.4f}" for x in b["metrics"]))
    print("per-step seconds (a): " + " ".join(f"{x['seconds']:.2f}" for x in a["metrics"]))
    print("per-step seconds (b): " + " ".join(f"{x['seconds']:.2f}" for x in b["metrics"]))

    # Fixed costs of (b): everything of the fit that is not an optimizer step.
    p = b["probe"]
    steps_s = sum(x["seconds"] for x in b["metrics"])
    fit_start = b["t_start"] + (b["train_s"] - b["fit_s"])  # train() builds the datasets before fit()
    startup = p["worker_group_s"] + p["imports_s"] + p["model_s"] + p["deepspeed_s"]
    last_step_end = fit_start + startup + steps_s  # estimated: the probe's start-up stands in for the fit's
    print(
        f"(b) fixed costs: train() {b['train_s']:.1f} s = driver set-up {b['train_s'] - b['fit_s']:.1f} s "
        f"+ fit {b['fit_s']:.1f} s; fit - summed step seconds {steps_s:.1f} s = {b['fit_s'] - steps_s:.1f} s "
        f"of start-up and tail (plain loop: model load {a['load_s']:.1f} s)"
    )
    print(
        f"  start-up (probe fit, same config, loop = imports + build_model + deepspeed.initialize): worker "
        f"group {p['worker_group_s']:.1f} s, imports {p['imports_s']:.1f} s, model load {p['model_s']:.1f} "
        f"s, deepspeed.initialize {p['deepspeed_s']:.1f} s; teardown {p['teardown_s']:.1f} s; probe fit "
        f"{p['fit_s']:.1f} s"
    )
    print(
        f"  tail (file times): last step -> export marker ~{b['export_done'] - last_step_end:.1f} s, -> "
        f"checkpoint persisted {b['checkpoint_done'] - b['export_done']:.1f} s, -> fit returned "
        f"{b['t_end'] - b['checkpoint_done']:.1f} s; ray.init {b['ray_init_s']:.1f} s, ray.shutdown "
        f"{b['shutdown_s']:.1f} s"
    )
    if "c" in res:
        c = res["c"]
        rc = steady(c["metrics"])[0]
        print(
            f"(c)/(b) tokens/s: {rc / steady(b['metrics'])[0]:.2f}; (c) fit {c['fit_s']:.1f} s - summed "
            f"steps {sum(x['seconds'] for x in c['metrics']):.1f} s; (c) trains a global batch of 2 x micro "
            f"x accum, so its losses are not comparable step by step; 1 CPU and torch_threads=1 per worker"
        )
    print(f"whole benchmark {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
