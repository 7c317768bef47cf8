"""Shared fixtures, built once per session: a tiny Llama with a locally trained tokenizer, the demo
assets, one local Ray instance, and a hostile-input corpus. Nothing is downloaded."""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import pytest

# Nothing in the tests comes from the hub: a hub id (a config's placeholder model) fails at once
# instead of after huggingface_hub's retries. Set before huggingface_hub is imported (it reads it once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from iterit.templates import CHATML_TEMPLATE  # noqa: E402

WORDS = (
    "the a model data answer question explain write code list python function return value error file "
    "number sum two three four five why how what when where please give example step first then next "
    "finally result is are was were be to of and in on for with by from this that it you we they"
).split()


def _training_text(n: int = 3000) -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(n):
        sent = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        lines.append(
            f"<|im_start|>user\n{sent.capitalize()}?<|im_end|>\n<|im_start|>assistant\n{sent}.<|im_end|>\n"
        )
    return lines


def _byte_level_bpe(vocab_size: int, specials: list[str]):
    """A byte-level BPE of `vocab_size` trained on _training_text, `specials` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_training_text(), trainer)
    return bpe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, hidden-64 Llama and a byte-level BPE (vocab 512) with a ChatML template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def build_tiny_model(out) -> str:
    """tiny_model_dir's model written into `out` (also what benchmarks/chaos.py runs its loops on)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = _byte_level_bpe(512, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


# A chat template of another family than ChatML (the tiny proxy's): plain role headers, no specials.
PROXY_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_proxy_dir(tmp_path_factory) -> str:
    """A tiny model of another family than tiny_model_dir's (a 1-layer GPT-2, hidden 32) with its own
    tokenizer (a BPE of vocab 300, so its token counts differ) and chat template: the proxy of the
    proxy-scoring tests."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_proxy")
    bpe = _byte_level_bpe(300, ["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = PROXY_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from iterit.templates import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def demo_assets() -> dict:
    """The real demo assets (SmolLM2-135M-Instruct, ShareGPT, GSM8K), built once per machine and cached."""
    from iterit.demo import prepare_demo

    return prepare_demo(log=lambda *_: None)


@pytest.fixture(scope="session")
def real_responses(demo_assets) -> list[str]:
    """The final responses of the demo ShareGPT corpus's first 600 conversations that end in one."""
    texts = []
    for line in open(demo_assets["train"], encoding="utf-8"):
        conv = json.loads(line)["conversations"]
        if conv and conv[-1].get("from") == "gpt" and conv[-1]["value"].strip():
            texts.append(conv[-1]["value"])
        if len(texts) == 600:
            break
    return texts


@pytest.fixture(scope="session")
def smollm_tokenizer(demo_assets):
    from iterit.templates import load_tokenizer

    return load_tokenizer(demo_assets["model"])


@pytest.fixture(scope="session")
def tiny_run_config(tiny_model_dir):
    """The config tree of a whole run on the tiny model (tiny_run_tree): call it with the corpus, the run
    directory and any keys to change."""
    return functools.partial(tiny_run_tree, tiny_model_dir)


def tiny_run_tree(model_dir, corpus, run_dir, **changes) -> dict:
    """A whole run on the tiny model: k = 6 samples per iteration (of a 60-row corpus), window 12, 2
    iterations of 3 optimizer steps on 1 CPU worker (also benchmarks/chaos.py's run, at 3 iterations)."""
    return {
        "base_model": model_dir,
        "datasets": [{"path": str(corpus)}],
        "output_dir": str(run_dir),
        "sequence_len": 64,
        "iterations": 2,
        "seed": 7,
        "selection": {"ratio": 6, "update_ratio": 2},
        "scoring": {"torch_threads": 1, "batch_size": 16, "template_cpus": 0.5},
        "ray_num_workers": 1,
        "deepspeed": 0,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "resources_per_worker": {"CPU": 1},
        **changes,
    }


def fit_tree(model_dir, run_dir, **changes) -> dict:
    """The config keys of the training tests' Ray Train fits: 2 CPU workers, micro-batches of 2, 2
    accumulation steps (16 samples -> 2 optimizer steps per iteration), ZeRO-2, 3 iterations."""
    return {
        "base_model": model_dir,
        "datasets": [{"path": "unused.jsonl"}],
        "output_dir": str(run_dir),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.2,
        "ray_num_workers": 2,
        "deepspeed": 2,
        "iterations": 3,
        "scoring": {"torch_threads": 1, "template_cpus": 0},
        **changes,
    }


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory, tiny_model_dir):
    """48 ingested samples and three selected subsets of 16."""
    import random

    from iterit.config import config_from_dict
    from iterit.data import ingest

    rng = random.Random(3)
    d = tmp_path_factory.mktemp("train_corpus")
    rows = [
        {
            "id": f"s{i}",
            "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))),
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))),
        }
        for i in range(48)
    ]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = ingest(
        config_from_dict(
            {"base_model": tiny_model_dir, "datasets": [{"path": str(d / "rows.jsonl")}]}
        ).datasets,
        str(d / "ingest"),
    )
    subsets = {e: [f"s{i}" for i in range(16 * e, 16 * e + 16)] for e in range(3)}
    return out["samples"], subsets


@pytest.fixture(scope="session")
def zero3_fit(ray_local, tiny_model_dir, train_corpus, tmp_path_factory) -> dict:
    """One ZeRO-3 fit, 2 workers on the session's one-node Ray, weights loaded into the partitions (the
    default), one iteration on subset 0: the reference of the partitioned-vs-full test and of the
    two-node test, which train the same config another way. Its config keys, run directory, metrics."""
    from iterit.config import config_from_dict
    from iterit.training.trainer import read_metrics, train

    samples, subsets = train_corpus
    run_dir = tmp_path_factory.mktemp("zero3_fit") / "run"
    tree = fit_tree(tiny_model_dir, run_dir, deepspeed=3, iterations=1)
    train(config_from_dict(tree), str(run_dir), {0: subsets[0]}, samples, k=16, name="zero3")
    return {"tree": tree, "run_dir": run_dir, "metrics": read_metrics(str(run_dir), 0)}


def iterit_main(argv: list) -> int:
    """`iterit ARGV` in this process; its exit code (for fixtures wider than one test, without capsys)."""
    from iterit.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code


@pytest.fixture()
def cli(capsys):
    """`iterit ARGV` in this process: (exit code, stdout, stderr)."""

    def run(argv: list) -> tuple[int, str, str]:
        code = iterit_main(argv)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, shut down at the end."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # 3 logical CPUs on 2 cores, as iterit's own local Ray (cluster.connect): a resumed scoring stage
    # runs Ray Data's checkpoint filter actor (1 CPU) beside a 1-CPU scoring actor and the reads.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------------------------
# Hostile input: what a careless export, a truncated upload or a bad merge produces.

GOOD_ALPACA = {"instruction": "Give three colours.", "input": "", "output": "Red, green and blue."}
BIG_OUTPUT = "word " * 2_000_000  # a 10 MB single line, valid


def _jsonl(rows) -> bytes:
    out = []
    for r in rows:
        out.append(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
    return b"\n".join(out) + b"\n"


@pytest.fixture()
def hostile_corpus(tmp_path) -> tuple[Path, dict]:
    """A directory of bad files, and the expected counts per file: read, accepted, reasons."""
    d = tmp_path / "hostile"
    d.mkdir()
    (d / "rows.jsonl").write_bytes(
        _jsonl(
            [
                GOOD_ALPACA,  # 0 ok
                b'{"instruction": "cut off", "output": ',  # 1 invalid_json
                {"instruction": 5, "output": "five"},  # 2 wrong_type
                {"instruction": "no answer"},  # 3 missing_field
                {"instruction": "blank", "output": "  \n "},  # 4 empty_response
                {"id": "dup", "instruction": "first", "output": "kept"},  # 5 ok
                {"id": "dup", "instruction": "second", "output": "dropped"},  # 6 duplicate_id
                b'{"instruction": "caf\xe9", "output": "latin-1 bytes"}',  # 7 bad_encoding
                {"instruction": "long", "output": BIG_OUTPUT},  # 8 ok, 10 MB line
                b"[1, 2, 3]",  # 9 wrong_type
                b"",  # blank line: not a row
                {
                    "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]
                },  # 11 bad_role
                {"conversations": [{"from": "human", "value": "anyone?"}]},  # 12 no_response
                {
                    "messages": [
                        {"role": "system", "content": "Be terse."},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"},
                        {"role": "user", "content": "thanks"},
                    ]
                },  # 13 ok
                {"text": "not a known format"},  # 14 missing_field
                {"messages": "not a list"},  # 15 wrong_type
            ]
        )
    )
    # A pretty-printed JSON array with one element that is not JSON, and one of the wrong shape.
    (d / "array.json").write_text(
        '[\n  {"instruction": "a", "output": "A"},\n  {"instruction": "b", "output": },\n'
        '  {"instruction": "c", "output": "C"},\n  "just a string",\n  {"instruction": "d", "output": "D"}\n]\n'
    )
    (d / "empty.jsonl").write_bytes(b"")
    expected = {
        "rows.jsonl": (
            15,
            4,
            {
                "invalid_json": 1,
                "wrong_type": 3,
                "missing_field": 2,
                "empty_response": 1,
                "duplicate_id": 1,
                "bad_encoding": 1,
                "bad_role": 1,
                "no_response": 1,
            },
        ),
        "array.json": (5, 3, {"invalid_json": 1, "wrong_type": 1}),
        "empty.jsonl": (0, 0, {}),
    }
    return d, expected


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory) -> Path:
    """Every row shape scoring meets, at --max-length 96 on the tiny tokenizer: single-turn, with input,
    multi-turn ShareGPT, messages with a system prompt, a response cut by max_length, a prompt that
    leaves no room for the response (response_truncated)."""
    import random

    rng = random.Random(1)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = [
        {
            "id": "alpaca",
            "instruction": "Explain why the sum is two.",
            "output": "Because one and one make two.",
        },
        {
            "id": "with-input",
            "instruction": "Write the function.",
            "input": "def f(x): return x",
            "output": "The function returns the value.",
        },
        {
            "id": "sharegpt",
            "conversations": [
                {"from": "human", "value": "What is the file?"},
                {"from": "gpt", "value": "It is the data."},
                {"from": "human", "value": "And then?"},
                {"from": "gpt", "value": "Then we list the number."},
            ],
        },
        {
            "id": "messages-system",
            "messages": [
                {"role": "system", "content": "You explain code."},
                {"role": "user", "content": "Why the error?"},
                {"role": "assistant", "content": "The file is not there, so the function fails."},
            ],
        },
        {"id": "cut-response", "instruction": "Give a long answer.", "output": text(120)},
        {"id": "no-room", "instruction": text(150), "output": "Short."},
    ]
    rows += [
        {"id": f"var-{i}", "instruction": text(rng.randint(2, 20)), "output": text(rng.randint(1, 40))}
        for i in range(14)
    ]
    p = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="session")
def loop_corpus(tmp_path_factory) -> Path:
    """60 Alpaca rows of random words (ids q0..q59) and one reject at ingest: the corpus of whole runs."""
    rng = random.Random(5)
    rows = [
        {
            "id": f"q{i}",
            "instruction": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))),
        }
        for i in range(60)
    ]
    rows.append({"id": "bad"})  # one reject at ingest
    p = tmp_path_factory.mktemp("loop") / "corpus.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="session")
def uninterrupted(ray_local, tiny_run_config, loop_corpus, tmp_path_factory):
    """The whole tiny run of loop_corpus, uninterrupted, on local disk: (run_dir, run()'s result), the
    reference of the resumed runs (test_loop, test_s3)."""
    from iterit.config import config_from_dict
    from iterit.loop import run

    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    tree = tiny_run_config(loop_corpus, run_dir, report_to="tensorboard")
    out = run(config_from_dict(tree), log=lambda *_: None)
    return run_dir, out


def proxy_tree(tiny_run_config, corpus, run_dir, proxy_dir, **changes) -> dict:
    """tiny_run_config's tree with scoring.proxy_model: a run whose iteration 0 is scored by the proxy."""
    tree = tiny_run_config(corpus, run_dir, **changes)
    tree["scoring"] = {**tree["scoring"], "proxy_model": proxy_dir}
    return tree


@pytest.fixture(scope="session")
def proxy_uninterrupted(ray_local, tiny_run_config, loop_corpus, tiny_proxy_dir, tmp_path_factory):
    """The whole tiny run of loop_corpus with the tiny proxy, uninterrupted: the reference of test_proxy's
    resumed runs and of the proxy run on S3."""
    from iterit.config import config_from_dict
    from iterit.loop import run

    run_dir = tmp_path_factory.mktemp("proxy_uninterrupted") / "run"
    out = run(
        config_from_dict(proxy_tree(tiny_run_config, loop_corpus, run_dir, tiny_proxy_dir)),
        log=lambda *_: None,
    )
    return run_dir, out
