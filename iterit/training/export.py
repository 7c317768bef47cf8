"""HF-format export of the current model at the end of an iteration: RunDir.model(e), RUN/model/iter_<e>/.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the job type only: train_loop imports this module
    from iterit.training.train_loop import WorkerJob

EXPORT_MARKER = "iterit_export.json"


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


def save_hf(module, state_dict: dict, job: WorkerJob, out: Path) -> None:
    """Write a from_pretrained-loadable folder from a full state dict of the trained `module`."""
    from transformers import AutoModelForCausalLM

    from iterit.templates import load_tokenizer

    lora = job.training.lora()
    if lora:
        from peft import LoraConfig, get_peft_model

        from iterit.io import local_copy

        base = AutoModelForCausalLM.from_pretrained(
            local_copy(job.base_model), trust_remote_code=job.trust_remote_code
        )
        peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
        peft_model.load_state_dict(state_dict, strict=True)
        if job.training.lora_export == "adapter":
            peft_model.save_pretrained(out)
        else:
            peft_model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    else:  # the module's own config and class; the weights come from the gathered dict
        module.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    load_tokenizer(job.base_model, job.chat_template, job.trust_remote_code).save_pretrained(out)


def export_model(engine, job: WorkerJob, e: int, rank: int) -> None:
    """Iteration e's model into job.run.model(e). A collective: every rank calls it (ZeRO-3 gathers the
    weights), rank 0 writes."""
    from iterit.io import filesystem, join

    state_dict = full_state_dict(engine)
    if rank != 0:
        return
    fs, p = filesystem(job.run.model(e))
    with tempfile.TemporaryDirectory(prefix="iterit-export-") as tmp:
        save_hf(engine.module, state_dict, job, Path(tmp))
        if fs.exists(p):  # an interrupted earlier attempt
            fs.rm(p, recursive=True)
        fs.makedirs(p, exist_ok=True)
        for f in sorted(Path(tmp).iterdir()):
            fs.put_file(str(f), f"{p}/{f.name}")
    lora = bool(job.training.lora_r)
    marker = {
        "iteration": e,
        "base_model": job.base_model,
        "lora": lora,
        "lora_export": job.training.lora_export if lora else None,
    }
    with fs.open(join(p, EXPORT_MARKER), "w") as f:
        f.write(json.dumps(marker))
