"""The two Ray Data stages of scoring, thin shells around the pure cores:

    template_rows  (CPU task)   messages -> conditional / prior token ids and the span (templates.py)
    Scorer         (actor)      loads the model once, scores micro-batches (losses.py)

Rows rejected on the way (response_truncated, nonfinite_loss) travel on with `reject` set, so the
writer sees every row exactly once.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from iterit.config import Config
from iterit.errors import RowError

TEMPLATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("cond_ids", pa.list_(pa.int32())),
        ("cond_start", pa.int32()),
        ("prior_ids", pa.list_(pa.int32())),
        ("prior_start", pa.int32()),
        ("span_len", pa.int32()),
        ("reject", pa.string()),
        ("detail", pa.string()),
    ]
)
# scoring.embedding_dtype -> (numpy dtype of the cast, Arrow type of the stored values)
EMBEDDING_TYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
CRASH_ONCE_ENV = (
    "ITERIT_TEST_CRASH_ONCE"  # tests: path of a marker; the first actor call to find it absent exits
)


def template_rows(batch: pa.Table, *, cfg: Config, fit_under: Config | None = None) -> pa.Table:
    """Normalised samples -> token ids and spans (TEMPLATED_SCHEMA), cut at cfg.sequence_len.

    `fit_under` (a proxy's pass: the base model's config): a row must also fit under that model's
    template, templated only (no forward pass), or it is rejected; each reject's detail then names
    the model whose template refused it."""
    from iterit.templates import cached_tokenizer, template_batch

    tok = cached_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)
    out = {name: [] for name in TEMPLATED_SCHEMA.names}
    messages = batch.column("messages").to_pylist()
    results = template_batch(tok, messages, cfg.sequence_len)
    if fit_under is not None:
        results = [_named(r, f"the proxy {cfg.base_model}") for r in results]
        base = cached_tokenizer(fit_under.base_model, fit_under.chat_template, fit_under.trust_remote_code)
        live = [i for i, r in enumerate(results) if not isinstance(r, RowError)]
        checks = template_batch(base, [messages[i] for i in live], fit_under.sequence_len)
        for i, check in zip(live, checks):
            if isinstance(check, RowError):
                results[i] = _named(check, f"the base model {fit_under.base_model}")
    for r in results:
        ok = not isinstance(r, RowError)
        out["cond_ids"].append(r.cond_ids if ok else [])
        out["cond_start"].append(r.cond_start if ok else 0)
        out["prior_ids"].append(r.prior_ids if ok else [])
        out["prior_start"].append(r.prior_start if ok else 0)
        out["span_len"].append(r.span_len if ok else 0)
        out["reject"].append("" if ok else r.reason)
        out["detail"].append("" if ok else r.detail)
    for name in ("id", "source", "row"):
        out[name] = batch.column(name)
    return pa.table(out, schema=TEMPLATED_SCHEMA)


def _named(result, model: str):
    """A reject whose detail says which model's template refused the row; anything else as it is."""
    if not isinstance(result, RowError):
        return result
    return RowError(result.reason, f"under {model}'s template: {result.detail}")


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_model(
    model: str, dtype: str = "auto", attn_implementation: str = "sdpa", trust_remote_code: bool = False
):
    """The causal LM in eval mode on this worker's device (the GPU Ray assigned, else the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from iterit.io import local_copy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = AutoModelForCausalLM.from_pretrained(
        local_copy(model),  # a previous iteration's export on object storage: copied to this node
        dtype=resolve_dtype(dtype, device),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return m.to(device).eval()


class Scorer:
    """Ray Data callable class: one model replica per actor, loaded once. `prior=False`: the conditional
    pass only; `embeddings` (derived on the driver, pipeline.with_embeddings) adds the embedding column."""

    def __init__(self, cfg: Config, prior: bool = True, embeddings: bool = True):
        sc = cfg.scoring
        if sc.torch_threads:
            import torch

            torch.set_num_threads(sc.torch_threads)
        self.model = load_model(cfg.base_model, sc.dtype, sc.attn_implementation, cfg.trust_remote_code)
        self.token_budget, self.embeddings, self.prior = sc.token_budget, embeddings, prior
        # The stored embedding: projected to embedding_dim (None: the hidden size), in embedding_dtype.
        self.embedding_dim, self.embedding_dtype = sc.embedding_dim, sc.embedding_dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        from iterit.scoring.losses import project_embeddings, score_templated
        from iterit.templates import Templated

        marker = os.environ.get(CRASH_ONCE_ENV)
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # simulate a dying actor (OOM kill, preempted node) mid-run

        n = batch.num_rows
        reject = batch.column("reject").to_pylist()
        detail = batch.column("detail").to_pylist()
        live = [i for i in range(n) if not reject[i]]
        cols = {
            name: batch.column(name).to_pylist()
            for name in ("cond_ids", "cond_start", "prior_ids", "prior_start", "span_len")
        }
        samples = [
            Templated(
                cols["cond_ids"][i],
                cols["cond_start"][i],
                cols["prior_ids"][i],
                cols["prior_start"][i],
                cols["span_len"][i],
            )
            for i in live
        ]
        loss_cond, loss_prior = np.full(n, np.nan), np.full(n, np.nan)
        emb = None
        computed = np.zeros(n, dtype=np.float64)
        if samples:
            s = score_templated(
                self.model, samples, self.token_budget, pad_id=0, embeddings=self.embeddings, prior=self.prior
            )
            loss_cond[live], loss_prior[live] = s.loss_cond, s.loss_prior
            if s.oom_splits:  # recovered, but each halving redid work: say which setting to lower
                print(
                    f"scoring: CUDA out of memory at token_budget {self.token_budget}: micro-batches halved "
                    f"{s.oom_splits} times in this batch; lower scoring.token_budget"
                )
            computed[live] = s.computed_tokens / len(samples)  # each row's share of the padded work
            if s.embedding is not None:
                vecs = project_embeddings(s.embedding, self.embedding_dim)  # (live, dim) float32, unit rows
                emb = np.zeros((n, vecs.shape[1]), dtype=np.float32)
                emb[live] = vecs
        ifd = np.exp(loss_cond - loss_prior)
        for i in live:
            checked = (loss_cond[i], loss_prior[i], ifd[i]) if self.prior else (loss_cond[i],)
            if not np.all(np.isfinite(checked)):
                reject[i] = "nonfinite_loss"
                detail[i] = f"loss_cond={loss_cond[i]}, loss_prior={loss_prior[i]}"
        starts = np.asarray(batch.column("cond_start"), dtype=np.int32)
        # A part of scores/ (rundir.ScoreFiles): docs/architecture.md section 3's columns first, then what the
        # summary and rejects.jsonl are built from.
        out = {
            "id": batch.column("id"),
            "ifd": ifd,
            "loss_cond": loss_cond,
            "loss_prior": loss_prior,
            "n_prompt_tokens": starts,
            "n_response_tokens": np.asarray(batch.column("span_len"), dtype=np.int32),
        }
        if self.embeddings:  # rows without an embedding (rejects) hold zeros
            dim = emb.shape[1] if emb is not None else self.embedding_dim or self.model.config.hidden_size
            flat = emb.reshape(-1) if emb is not None else np.zeros(n * dim, dtype=np.float32)
            np_type, pa_type = EMBEDDING_TYPES[self.embedding_dtype]
            values = pa.array(flat.astype(np_type, copy=False), pa_type)
            out["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim)
        out.update(
            source=batch.column("source"),
            row=batch.column("row"),
            reject=pa.array(reject, pa.string()),
            detail=pa.array(detail, pa.string()),
            real_tokens=np.array(
                [len(c) + (len(p) if self.prior else 0) for c, p in zip(cols["cond_ids"], cols["prior_ids"])],
                dtype=np.int64,
            ),
            computed_tokens=computed,
        )
        return pa.table(out)
