"""HF-format export of the current model at the end of an iteration: RUN/model/iter_<e>/.

Loadable with `AutoModelForCausalLM.from_pretrained` (safetensors) and carrying the tokenizer and its
chat template, so the next scoring pass and any user load it like the base model. Under ZeRO-3 the
weights are gathered into one 16-bit state dict on rank 0 (every rank must take part). A LoRA run
exports the adapter merged into full weights, or the adapter alone (`lora_export: adapter`).

The folder is written locally, then copied to the run directory (local, NFS or an fsspec URI);
`iterit_export.json` is written last, so a folder without it is an interrupted export.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

EXPORT_MARKER = "iterit_export.json"


def model_dir(run_dir: str, e: int) -> str:
    from iterit.io import join

    return join(run_dir, "model", f"iter_{e}")


def is_exported(path: str) -> bool:
    from iterit.io import filesystem, join

    fs, p = filesystem(join(path, EXPORT_MARKER))
    return fs.exists(p)


def full_state_dict(engine):
    """The whole model's state dict on rank 0 (None elsewhere); a collective under ZeRO-3."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if rank == 0 else None


def save_hf(module, state_dict: dict, c: dict, out: Path) -> None:
    """Write a from_pretrained-loadable folder from a full state dict of the trained `module`."""
    from transformers import AutoModelForCausalLM

    from iterit.templates import load_tokenizer

    if c["lora"]:
        from peft import LoraConfig, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(c["base_model"], trust_remote_code=c["trust_remote_code"])
        peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **c["lora"]))
        peft_model.load_state_dict(state_dict, strict=True)
        if c["lora_export"] == "adapter":
            peft_model.save_pretrained(out)
        else:
            peft_model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    else:  # the module's own config and class; the weights come from the gathered dict
        module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    load_tokenizer(c["base_model"], c["chat_template"], c["trust_remote_code"]).save_pretrained(out)


def export_model(engine, c: dict, e: int, rank: int) -> None:
    from iterit.io import filesystem, join

    state_dict = full_state_dict(engine)
    if rank != 0:
        return
    dest = model_dir(c["run_dir"], e)
    fs, p = filesystem(dest)
    with tempfile.TemporaryDirectory(prefix="iterit-export-") as tmp:
        save_hf(engine.module, state_dict, c, Path(tmp))
        if fs.exists(p):  # an interrupted earlier attempt
            fs.rm(p, recursive=True)
        fs.makedirs(p, exist_ok=True)
        for f in sorted(Path(tmp).iterdir()):
            fs.put_file(str(f), f"{p}/{f.name}")
    with fs.open(join(p, EXPORT_MARKER), "w") as f:
        f.write(
            json.dumps(
                {
                    "iteration": e,
                    "base_model": c["base_model"],
                    "lora": bool(c["lora"]),
                    "lora_export": c["lora_export"] if c["lora"] else None,
                }
            )
        )
