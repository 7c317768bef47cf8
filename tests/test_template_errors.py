"""Chat templates that raise (docs/architecture.md section 7): a row the template refuses is a `template_error` reject
with the template's own message, never a failed batch or run; a template that refuses the whole corpus
stops the stage with one line that names the cause and the fix."""

import json
from collections import Counter

import pytest

from iterit.config import DatasetConfig, config_from_dict
from iterit.data import REJECT_REASONS, ingest
from iterit.errors import IteritError, RowError
from iterit.templates import (
    CHATML_TEMPLATE,
    PRIOR_NOTE,
    check_template_failures,
    count_failure,
    load_tokenizer,
    template_batch,
    template_failures,
    template_sample,
)
from iterit.training.examples import training_examples

ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
NO_SYSTEM = "System role not supported"


def raising(condition: str, message: str) -> str:
    """ChatML behind a guard that renders nothing: rows it lets through template byte for byte as ChatML."""
    return "{% if " + condition + " %}{{ raise_exception('" + message + "') }}{% endif %}" + CHATML_TEMPLATE


# Like Mistral's and Llama-2's templates: two consecutive turns of one role are refused...
ALTERNATING_CHATML = (
    "{% set ns = namespace(twice=false) %}{% for m in messages %}"
    "{% if not loop.first and m['role'] == messages[loop.index0 - 1]['role'] %}{% set ns.twice = true %}"
    "{% endif %}{% endfor %}" + raising("ns.twice", ALTERNATE)
)
# ...and like Gemma's, any system turn.
NO_SYSTEM_CHATML = raising("messages[0]['role'] == 'system'", NO_SYSTEM)
# Mistral's actual rule: the first non-system turn is a user turn. The prior text ([assistant: R]
# alone) breaks it on every row, however well the conversation alternates.
USER_FIRST_CHATML = "{% set turns = messages | rejectattr('role', 'equalto', 'system') | list %}" + raising(
    "turns[0]['role'] != 'user'", ALTERNATE
)

SYS = {"role": "system", "content": "You are a helpful assistant."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVS = [
    [SYS, user("Why is the sum two?"), assistant("Because one and one.")],
    [SYS, user("Hi"), user("Are you there?"), assistant("Yes, here.")],  # two user turns in a row
    [SYS, user("Hi"), assistant("Hello"), user("Write code."), assistant("print(1)")],
    [user("No system turn here."), assistant("Fine.")],
    [SYS, user("a"), user("b"), user("c"), assistant("three in a row")],  # two pairs in a row
]


def tokenizer(model_dir, template):
    return load_tokenizer(model_dir, chat_template=template)


class CountingTokenizer:
    """The tokenizer, counting its encode calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)


def test_template_error_is_a_row_reject_with_the_template_message(tiny_model_dir, tiny_tokenizer):
    tok = CountingTokenizer(tokenizer(tiny_model_dir, ALTERNATING_CHATML))
    got = template_batch(tok, CONVS, 512)
    assert tok.calls == 2  # the good rows are still tokenised in one call per text kind
    bad = {1, 4}
    for i, r in enumerate(got):
        if i in bad:
            assert isinstance(r, RowError) and (r.reason, r.detail) == ("template_error", ALTERNATE)
    good = [c for i, c in enumerate(CONVS) if i not in bad]
    # The other rows of the batch are exactly what plain ChatML gives them (the ids and the spans).
    assert [r for i, r in enumerate(got) if i not in bad] == template_batch(tiny_tokenizer, good, 512)
    with pytest.raises(RowError) as e:
        template_sample(tok, CONVS[1], 512)
    assert e.value.reason == "template_error" and e.value.detail == ALTERNATE
    assert "template_error" in REJECT_REASONS


def test_a_template_that_refuses_system_turns(tiny_model_dir, tiny_tokenizer):
    tok = tokenizer(tiny_model_dir, NO_SYSTEM_CHATML)
    got = template_batch(tok, CONVS, 512)
    assert [(r.reason, r.detail) for r in got if isinstance(r, RowError)] == [
        ("template_error", NO_SYSTEM)
    ] * 4
    assert got[3] == template_sample(tiny_tokenizer, CONVS[3], 512)  # the one row without a system turn


def test_a_failure_in_the_prior_text_says_so(tiny_model_dir):
    """The conversation alternates, but [assistant: R] alone does not start with a user turn."""
    tok = tokenizer(tiny_model_dir, USER_FIRST_CHATML)
    (r,) = template_batch(tok, CONVS[:1], 512)
    assert r.reason == "template_error" and r.detail == ALTERNATE + PRIOR_NOTE


def test_other_exceptions_from_template_code_and_unlocatable_responses(tiny_model_dir, tiny_tokenizer):
    # Template code that fails on some rows (a TypeError here), and one that drops some responses.
    typed = tokenizer(
        tiny_model_dir, "{% if messages | length > 3 %}{{ 1 + 'a' }}{% endif %}" + CHATML_TEMPLATE
    )
    got = template_batch(typed, CONVS, 512)
    assert [isinstance(r, RowError) for r in got] == [False, True, True, False, True]
    assert got[1].reason == "template_error" and got[1].detail.startswith("TypeError: unsupported operand")
    assert got[0] == template_sample(tiny_tokenizer, CONVS[0], 512)
    dropping = tokenizer(
        tiny_model_dir,
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if 'zebra' not in m['content'] %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}",
    )
    got = template_batch(dropping, [CONVS[0], [SYS, user("q"), assistant("a zebra")]], 512)
    assert got[0] == template_sample(tiny_tokenizer, CONVS[0], 512)
    assert got[1].reason == "response_truncated"  # as before: the template does not contain the response
    assert template_batch(dropping, [[SYS, user("q"), assistant("zebra")]] * 3, 512)[2].reason == (
        "response_truncated"
    )


def test_interrupts_are_not_rejects(tiny_tokenizer, monkeypatch):
    import iterit.templates

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(iterit.templates, "render", interrupted)
    with pytest.raises(KeyboardInterrupt):
        template_batch(tiny_tokenizer, CONVS[:1], 512)


@pytest.mark.parametrize("train_on", ["final_response", "all_assistant"])
def test_training_examples_keep_good_rows_unchanged(tiny_model_dir, tiny_tokenizer, train_on):
    tok = tokenizer(tiny_model_dir, ALTERNATING_CHATML)
    got = training_examples(tok, CONVS, 512, train_on)
    want = training_examples(tiny_tokenizer, CONVS, 512, train_on)
    for i, (g, w) in enumerate(zip(got, want)):
        if i in (1, 4):
            assert isinstance(g, RowError) and g.reason == "template_error"
        else:
            assert g == w


# ---- the whole corpus refused: one line


def test_all_rows_failing_the_same_way_is_one_line_naming_the_fix():
    with pytest.raises(IteritError) as e:
        check_template_failures(24, 0, Counter({NO_SYSTEM: 24}), "You are a helpful assistant.")
    msg = str(e.value)
    assert "\n" not in msg and NO_SYSTEM in msg and "all 24 rows" in msg and "`system_prompt: null`" in msg
    # The data's own system turns (no system_prompt configured): the fix is the template.
    with pytest.raises(IteritError, match="fix the chat_template, or set `chat_template: chatml`") as e:
        check_template_failures(24, 0, Counter({NO_SYSTEM: 24}), None)
    assert "system_prompt: null" not in str(e.value)
    with pytest.raises(IteritError, match="fix the chat_template, or set `chat_template: chatml`") as e:
        check_template_failures(10, 0, Counter({ALTERNATE: 7, "TypeError: x": 3}), "S")
    assert "all 10 rows with 'Conversation roles must alternate" in str(e.value)
    assert "(7 of them; 3 with other messages)" in str(e.value)
    with pytest.raises(IteritError, match="23 of 24 rows"):  # the last one was response_truncated
        check_template_failures(24, 0, Counter({"first line\nsecond line": 23}), "S")


def test_some_rows_failing_is_not_an_error():
    check_template_failures(24, 20, Counter({ALTERNATE: 4}), "S")  # rejects, the run goes on
    check_template_failures(24, 1, Counter({NO_SYSTEM: 23}), "S")
    # Nothing scored, but mostly response_truncated: not the template's doing.
    check_template_failures(24, 0, Counter({ALTERNATE: 4}), "S")
    check_template_failures(24, 0, Counter(), "S")
    check_template_failures(0, 0, Counter(), "S")


def test_the_failure_count_is_bounded_and_exact(tmp_path):
    failures = Counter()
    for i in range(250):
        count_failure(failures, f"message {i % 150}")
    assert len(failures) == 101 and sum(failures.values()) == 250 and failures["message 0"] == 2
    p = tmp_path / "rejects.jsonl"
    rows = [{"reason": "template_error", "detail": ALTERNATE}] * 3 + [
        {"reason": "duplicate_id", "detail": "x"}
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert template_failures(str(p)) == Counter({ALTERNATE: 3})


# ---- end to end: what a new user sees from `run_scoring`

MAX_LEN = 96


def scoring_config(model_dir, out, template, **extra):
    return config_from_dict(
        {
            "base_model": model_dir,
            "datasets": [{"path": "unused"}],
            "output_dir": str(out),
            "sequence_len": MAX_LEN,
            "chat_template": template,
            "scoring": {
                "batch_size": 8,  # 3 blocks: the refused rows land in several batches
                "token_budget": 1024,
                "max_actors": 1,
                "cpus_per_actor": 1,
                "template_cpus": 0.25,
                "embeddings": False,
            },
            **extra,
        }
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 rows: 20 Alpaca rows and 4 messages rows with two consecutive user turns."""
    rows = [
        {"id": f"a{i}", "instruction": f"Give number {i}.", "output": f"The number is {i}."}
        for i in range(20)
    ]
    for i in range(4):
        turns = [user("Hi"), user(f"Question {i}?"), assistant(f"Answer {i}.")]
        rows.insert(5 * i + 2, {"id": f"twice{i}", "messages": turns})
    p = tmp_path_factory.mktemp("corpus") / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_scoring_rejects_the_rows_a_template_refuses(ray_local, tiny_model_dir, corpus, tmp_path):
    from iterit.rundir import read_scores
    from iterit.scoring.pipeline import run_scoring

    cfg = scoring_config(tiny_model_dir, tmp_path, ALTERNATING_CHATML)
    ingested = ingest([DatasetConfig(path=str(corpus))], str(tmp_path / "ingest"), cfg.system_prompt)
    summary = run_scoring(cfg, ingested["samples"], str(tmp_path / "scores"), log=lambda *_: None)
    rejects = [json.loads(line) for line in open(summary["rejects"])]
    assert sorted(r["id"] for r in rejects) == [f"twice{i}" for i in range(4)]
    assert {(r["reason"], r["detail"]) for r in rejects} == {("template_error", ALTERNATE)}
    assert summary["rejected_by_reason"] == {"template_error": 4}
    assert summary["scored"] + summary["rejected"] == summary["rows"] == 24
    assert read_scores(summary["scores"]).num_rows == 20


def test_a_template_that_refuses_every_row_is_one_clear_line(ray_local, tiny_model_dir, corpus, tmp_path):
    from iterit.scoring.pipeline import run_scoring

    cfg = scoring_config(tiny_model_dir, tmp_path, NO_SYSTEM_CHATML)
    ingested = ingest([DatasetConfig(path=str(corpus))], str(tmp_path / "ingest"), cfg.system_prompt)
    with pytest.raises(IteritError) as e:
        run_scoring(cfg, ingested["samples"], str(tmp_path / "scores"), log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and NO_SYSTEM in msg and "all 24 rows" in msg and "`system_prompt: null`" in msg
    summary = json.loads((tmp_path / "scores" / "score_summary.json").read_text())
    assert summary["rejected_by_reason"] == {"template_error": 24}  # the stage's files say the same
