"""Held-out evaluation of a model: response loss with the scoring span, and GSM8K exact match.

    evaluate_loss   held-out conversations -> ingest -> run_scoring (conditional pass only) -> scores.parquet
                    -> token-weighted mean loss_cond over the spans, perplexity = exp(loss)
    evaluate_gsm8k  {question, answer "... #### N"} rows -> chat template + generation prompt ->
                    greedy decoding on a Ray Data actor pool (Generator) -> gsm8k_predictions.jsonl
                    -> the number after the last "####" (else the last number) against the gold
    evaluate_lm_eval  lm-evaluation-harness tasks (optional extra `iterit[lm-eval]`) -> lm_eval.json
    run_eval        all that were asked for, into OUTPUT/eval.json

The loss is the scoring span's (docs/architecture.md section 2): the response plus the template's end-of-turn
tokens, so held-out loss and training loss measure the same tokens.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np
import pyarrow as pa

from iterit.config import Config, DatasetConfig
from iterit.errors import IteritError, RowError
from iterit.io import atomic_open, atomic_write_text, join

NO_GOLD = "no_gold_answer"  # the reject reason of a GSM8K row whose answer has no "#### N"

# A number as GSM8K writes them: "1,234", "18.50", "$5", "-3", "-$7". Commas only in groups of three
# ("1,2,3" is three numbers); a minus counts only where it cannot be subtraction ("16-3" is 16 and 3).
NUMBER = re.compile(r"(?:(?<![\w)])(-))?(?:\$\s?(-)?)?(\d{1,3}(?:,\d{3}(?!\d))+(?:\.\d+)?|\d+(?:\.\d+)?)")


# --------------------------------------------------------------------------------------------
# Answers (pure)


def _number(m: re.Match) -> str:
    """A NUMBER match normalised: no commas or $, no trailing zeros after the point, no trailing point."""
    digits = m.group(3).replace(",", "")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    sign = "-" if (m.group(1) or m.group(2)) and digits.strip("0") else ""
    return sign + digits


def extract_answer(text: str) -> str | None:
    """The model's final answer: the first number after the last "####" when there is one, else the
    last number in the text; None when the text has no number."""
    if "####" in text:
        m = NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return _number(m)
    matches = list(NUMBER.finditer(text))
    return _number(matches[-1]) if matches else None


def gold_answer(answer: str) -> str:
    """The reference answer of a GSM8K solution ("... #### 1,234" -> "1234"); RowError without one."""
    if "####" not in answer:
        raise RowError(NO_GOLD, "the answer has no final '#### N' line")
    m = NUMBER.search(answer.rsplit("####", 1)[1])
    if not m:
        raise RowError(
            NO_GOLD, f"no number after the last '####': {answer.rsplit('####', 1)[1].strip()[:40]!r}"
        )
    return _number(m)


def answers_match(prediction: str | None, gold: str) -> bool:
    """Exact match of two normalised answers, as numbers ("0.5" == ".5" == "0.50")."""
    if prediction is None:
        return False
    try:
        return Decimal(prediction) == Decimal(gold)
    except InvalidOperation:
        return prediction == gold


def exact_match(predictions: Sequence[str | None], golds: Sequence[str]) -> float:
    """Fraction of predictions equal to their gold answer."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    return sum(answers_match(p, g) for p, g in zip(predictions, golds)) / len(golds) if golds else 0.0


def score_predictions(rows: list[dict], outputs: list[str]) -> list[dict]:
    """Generated texts -> prediction records {id, question, gold, prediction, correct, output}."""
    out = []
    for r, text in zip(rows, outputs, strict=True):
        pred = extract_answer(text)
        out.append(
            {
                "id": r["id"],
                "question": r["question"],
                "gold": r["gold"],
                "prediction": pred,
                "correct": answers_match(pred, r["gold"]),
                "output": text,
            }
        )
    return out


def prompt_messages(question: str, system_prompt: str | None) -> list[dict]:
    """The conversation a GSM8K question is asked in: [system prompt,] user question."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [{"role": "user", "content": question}]


def _question_and_gold(rec) -> tuple[str, str]:
    """GSM8K {question, answer} or Alpaca {instruction, input?, output} -> (question, normalised gold)."""
    if not isinstance(rec, dict):
        raise RowError("wrong_type", f"the row is a {type(rec).__name__}, expected a JSON object")
    if "question" in rec or "answer" in rec:
        q_key, a_key, extra = "question", "answer", None
    elif "instruction" in rec or "output" in rec:
        q_key, a_key, extra = "instruction", "output", rec.get("input")
    else:
        raise RowError(
            "missing_field",
            f"none of question/answer (GSM8K) or instruction/output (Alpaca); "
            f"fields present: {sorted(rec)[:8]}",
        )
    for key in (q_key, a_key):
        if key not in rec:
            raise RowError("missing_field", f"no '{key}' field")
        if not isinstance(rec[key], str):
            raise RowError("wrong_type", f"'{key}' is a {type(rec[key]).__name__}, expected a string")
    if not rec[q_key].strip():
        raise RowError("missing_field", f"'{q_key}' is empty")
    question = rec[q_key] + "\nInput: " + extra if isinstance(extra, str) and extra else rec[q_key]
    try:  # the reader keeps invalid bytes as lone surrogates; they would fail later, in Arrow
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(
            "bad_encoding", f"the question holds bytes that are not UTF-8 at character {e.start}"
        ) from None
    return question, gold_answer(rec[a_key])


def read_gsm8k(path: str, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """(rows {id, question, gold, source, row}, rejects {source, row, id, reason, detail}) of a file,
    directory or glob. Reading stops after `limit` usable rows."""
    from iterit.data import expand_paths, id_prefixes, read_records, sample_id

    ds = DatasetConfig(path=path)  # its field_id ("id") names the optional id field, as in ingest
    files = expand_paths(path)
    prefixes = id_prefixes(files)
    rows, rejects, seen = [], [], set()
    for uri in files:
        for row, rec in read_records(uri):
            if limit is not None and len(rows) >= limit:
                return rows, rejects
            sid = None
            try:
                if isinstance(rec, RowError):
                    raise rec
                if isinstance(rec, dict):  # the id first, so a reject names it
                    sid = sample_id(rec, ds, f"{prefixes[uri]}:{row}")
                question, gold = _question_and_gold(rec)
                if sid in seen:
                    raise RowError("duplicate_id", f"id {sid!r} was already used")
            except RowError as e:
                rejects.append(
                    {
                        "source": uri,
                        "row": row if row >= 0 else None,
                        "id": sid,
                        "reason": e.reason,
                        "detail": e.detail,
                    }
                )
                continue
            seen.add(sid)
            rows.append({"id": sid, "question": question, "gold": gold, "source": uri, "row": row})
    return rows, rejects


def aggregate_losses(loss_cond: np.ndarray, n_tokens: np.ndarray) -> dict:
    """Span losses per sample -> {loss (token-weighted), ppl, mean_sample_loss, n, tokens}."""
    loss_cond, n_tokens = np.asarray(loss_cond, np.float64), np.asarray(n_tokens, np.float64)
    loss = float(np.sum(loss_cond * n_tokens) / np.sum(n_tokens))
    return {
        "loss": loss,
        "ppl": math.exp(loss) if loss < 700 else math.inf,
        "mean_sample_loss": float(np.mean(loss_cond)),
        "n": int(loss_cond.size),
        "tokens": int(np.sum(n_tokens)),
    }


# --------------------------------------------------------------------------------------------
# Generation on a Ray Data actor pool


def _stop_ids(tok, model) -> list[int]:
    """Token ids that end an answer: the model's and tokenizer's eos, and ChatML's end of turn when the
    template uses it (a tokenizer given ChatML by iterit may name another eos)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    ids.add(tok.eos_token_id)
    if "<|im_end|>" in (tok.chat_template or "") and "<|im_end|>" in tok.get_vocab():
        ids.add(tok.convert_tokens_to_ids("<|im_end|>"))
    return sorted(i for i in ids if i is not None)


class Generator:
    """Ray Data callable class: one model replica per actor, greedy answers for a batch of questions."""

    def __init__(self, cfg: Config, max_new_tokens: int):
        from transformers import GenerationConfig

        from iterit.scoring.actor import load_model
        from iterit.templates import load_tokenizer

        sc = cfg.scoring
        if sc.torch_threads:
            import torch

            torch.set_num_threads(sc.torch_threads)
        self.model = load_model(cfg.base_model, sc.dtype, sc.attn_implementation, cfg.trust_remote_code)
        self.tok = load_tokenizer(cfg.base_model, cfg.chat_template, cfg.trust_remote_code)
        self.tok.padding_side = "left"  # generation appends on the right: prompts end at the same column
        self.system_prompt = cfg.system_prompt
        self.gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=_stop_ids(self.tok, self.model),
            pad_token_id=self.tok.pad_token_id,
        )

    def generate(self, questions: list[str]) -> list[str]:
        import torch

        prompts = [
            self.tok.apply_chat_template(
                prompt_messages(q, self.system_prompt), tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ]
        # The chat template supplies the special tokens (docs/architecture.md section 2).
        enc = self.tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(
            self.model.device
        )
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=self.gen)  # (B, T_prompt + T_new)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        outputs = self.generate(batch.column("question").to_pylist())
        return pa.table({"pos": batch.column("pos"), "output": pa.array(outputs, pa.string())})


def evaluate_gsm8k(
    cfg: Config,
    data_path: str,
    output_dir: str,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    log=print,
) -> dict:
    """Greedy GSM8K exact match of cfg.base_model -> OUTPUT/gsm8k_predictions.jsonl (+ gsm8k_rejects.jsonl).

    `limit`: the first `limit` usable rows only. Rows without a gold "#### N" are rejects, counted."""
    import ray

    from iterit import cluster

    t0 = time.perf_counter()
    rows, rejects = read_gsm8k(data_path, limit)
    with atomic_open(join(output_dir, "gsm8k_rejects.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    by_reason = dict(Counter(r["reason"] for r in rejects).most_common())
    if not rows:
        raise IteritError(
            f"no usable GSM8K rows in {data_path} ({len(rejects)} rejected: {by_reason}); "
            "rows need {question, answer ending in '#### N'} or {instruction, output}"
        )
    cluster.connect()
    sc = cfg.scoring
    gpus = cluster.scoring_gpus(sc)
    cluster.check_pool_fits(sc, gpus, log)
    table = pa.table(
        {"pos": pa.array(range(len(rows)), pa.int64()), "question": [r["question"] for r in rows]}
    )
    # One block per batch, so an autoscaling pool shares the questions out.
    ds = ray.data.from_arrow([table.slice(i, batch_size) for i in range(0, len(rows), batch_size)])
    ds = ds.map_batches(
        Generator,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=sc.min_actors, max_size=sc.max_actors, max_tasks_in_flight_per_actor=2 if gpus > 0 else 1
        ),
        num_gpus=gpus,
        num_cpus=sc.cpus_per_actor,
        fn_constructor_kwargs=dict(cfg=cfg, max_new_tokens=max_new_tokens),
    )
    outputs: list[str | None] = [None] * len(rows)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for pos, text in zip(batch.column("pos").to_pylist(), batch.column("output").to_pylist()):
            outputs[pos] = text
    missing = [rows[i]["id"] for i, o in enumerate(outputs) if o is None]
    if missing:  # Ray Data retries failed batches; a hole here is a bug, not a score of 0
        raise IteritError(f"generation returned no output for {len(missing)} questions (first: {missing[0]})")
    records = score_predictions(rows, outputs)
    path = join(output_dir, "gsm8k_predictions.jsonl")
    with atomic_open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    correct = sum(r["correct"] for r in records)
    result = {
        "exact_match": correct / len(records),
        "n": len(records),
        "correct": correct,
        "rejected": len(rejects),
        "rejected_by_reason": by_reason,
        "max_new_tokens": max_new_tokens,
        "predictions": path,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log(
        f"GSM8K exact match {result['exact_match']:.1%} ({correct} of {len(records)}); "
        f"{len(rejects)} rows rejected -> {path}"
    )
    return result


# --------------------------------------------------------------------------------------------
# Held-out loss


def _datasets(data_paths: str | Sequence[str | DatasetConfig]) -> list[DatasetConfig]:
    if isinstance(data_paths, (str, DatasetConfig)):
        data_paths = [data_paths]
    return [d if isinstance(d, DatasetConfig) else DatasetConfig(path=d) for d in data_paths]


def evaluate_loss(
    cfg: Config, data_paths: str | Sequence[str | DatasetConfig], output_dir: str, log=print
) -> dict:
    """Held-out response loss and perplexity of cfg.base_model over the scoring span -> OUTPUT/loss.json.

    Ingests into OUTPUT/ingest and scores into OUTPUT (scores.parquet, rejects.jsonl with every reject)."""
    from iterit import cluster
    from iterit.data import ingest
    from iterit.rundir import read_scores
    from iterit.scoring.pipeline import run_scoring

    t0 = time.perf_counter()
    ingested = ingest(_datasets(data_paths), join(output_dir, "ingest"), cfg.system_prompt)
    cluster.connect()
    # The loss is loss_cond's: the prior pass (IFD's denominator, and the embeddings' input) would
    # double the work for nothing.
    scored = run_scoring(
        cfg, ingested["samples"], output_dir, rejects_prefix=ingested["rejects"], log=log, prior=False
    )
    by_reason = Counter(ingested["rejected_by_reason"]) + Counter(scored["rejected_by_reason"])
    table = read_scores(scored["scores"])
    if table.num_rows == 0:
        raise IteritError(
            f"no held-out sample could be scored ({dict(by_reason)}); see {scored['rejects']} "
            f"(response_truncated: raise sequence_len, now {cfg.sequence_len})"
        )
    result = {
        **aggregate_losses(
            table.column("loss_cond").to_numpy(), table.column("n_response_tokens").to_numpy()
        ),
        "read": ingested["read"],
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": dict(by_reason.most_common()),
        "model": cfg.base_model,
        "sequence_len": cfg.sequence_len,
        "scores": scored["scores"],
        "rejects": scored["rejects"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    # loss.json, not eval.json: run_eval writes eval.json (loss and gsm8k together) into the same folder.
    atomic_write_text(join(output_dir, "loss.json"), json.dumps(result, indent=2) + "\n")
    log(
        f"held-out loss {result['loss']:.4f} (ppl {result['ppl']:.2f}) over {result['n']:,} samples, "
        f"{result['tokens']:,} response tokens; {result['rejected']:,} rejected"
    )
    return result


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional extra)

LM_EVAL_HINT = (
    'pip install "iterit[lm-eval]" (lm-evaluation-harness; its tasks fetch their data from the HF hub)'
)


def parse_tasks(text: str | None) -> list[str]:
    """ "gsm8k, arc_easy" -> ["gsm8k", "arc_easy"] (order kept, duplicates dropped)."""
    return list(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))


def evaluate_lm_eval(
    cfg: Config,
    tasks: Sequence[str],
    output_dir: str,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log=print,
) -> dict:
    """lm-evaluation-harness tasks on cfg.base_model, in this process (on its GPU when it has one)
    -> OUTPUT/lm_eval.json {tasks: {task: {metric: value}}, ...}.

    The harness brings its own prompts, few-shot examples and metrics, and downloads each task's data
    from the HF hub: it needs a machine that reaches the hub (or a warm HF_DATASETS cache). A model with
    a chat template is prompted through it, as iterit trains it."""
    try:
        import lm_eval
    except ImportError:
        raise IteritError(
            f"lm-evaluation-harness tasks need the lm-eval package, which is not installed: {LM_EVAL_HINT}"
        ) from None
    import torch
    from transformers import AutoTokenizer

    from iterit.scoring.actor import resolve_dtype

    if not tasks:
        raise IteritError("no lm-evaluation-harness task given: e.g. --lm-eval gsm8k,arc_easy")
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(resolve_dtype(cfg.scoring.dtype, device)).removeprefix("torch.")
    # The harness renders prompts with the tokenizer's own template (not iterit's ChatML fallback).
    chat = bool(
        getattr(
            AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code),
            "chat_template",
            None,
        )
    )
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": cfg.base_model, "dtype": dtype, "trust_remote_code": cfg.trust_remote_code},
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        apply_chat_template=chat,
        log_samples=False,
    )
    if not out or "results" not in out:  # simple_evaluate returns None on non-zero ranks
        raise IteritError(f"lm-evaluation-harness returned no results for {', '.join(tasks)}")
    scores = {
        task: {
            m: float(v) for m, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for task, metrics in out["results"].items()
    }
    result = {
        "tasks": scores,
        "requested": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "chat_template": chat,
        "dtype": dtype,
        "device": device,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(join(output_dir, "lm_eval.json"), json.dumps(result, indent=2) + "\n")
    for task, metrics in scores.items():
        log(f"lm-eval {task}: " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
    return result


def run_eval(
    cfg: Config,
    data_paths: str | Sequence[str | DatasetConfig] | None,
    output_dir: str,
    gsm8k: str | None = None,
    limit: int | None = None,
    lm_eval_tasks: Sequence[str] | None = None,
    num_fewshot: int | None = None,
    log=print,
) -> dict:
    """Held-out loss on `data_paths`, GSM8K exact match on `gsm8k` (its first `limit` questions) and/or
    lm-evaluation-harness tasks (their first `limit` rows)
    -> OUTPUT/eval.json {model, loss?, gsm8k?, lm_eval?}."""
    if not data_paths and not gsm8k and not lm_eval_tasks:
        raise IteritError(
            "nothing to evaluate: give held-out data (--data), a GSM8K file (--gsm8k) "
            "and/or lm-evaluation-harness tasks (--lm-eval)"
        )
    result: dict = {"model": cfg.base_model}
    if data_paths:
        result["loss"] = evaluate_loss(cfg, data_paths, output_dir, log=log)
    if gsm8k:
        result["gsm8k"] = evaluate_gsm8k(cfg, gsm8k, output_dir, limit=limit, log=log)
    if lm_eval_tasks:
        result["lm_eval"] = evaluate_lm_eval(
            cfg, lm_eval_tasks, output_dir, limit=limit, num_fewshot=num_fewshot, log=log
        )
    atomic_write_text(join(output_dir, "eval.json"), json.dumps(result, indent=2) + "\n")
    return result
