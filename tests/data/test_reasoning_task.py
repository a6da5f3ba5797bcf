"""Tests of the embedded reasoning task (generation, traces, answers, noise)."""

import random
import re

import pytest

from lightning_tokens.data.reasoning_task import (
    Problem,
    ReasoningTask,
    check_answer,
    corrupt_text,
    extract_answer,
    generate_problems,
    render_completion,
    render_corpus,
    render_prompt,
    render_thinking,
    thinking_length,
)

UNIT = re.compile(r"\d|[A-Za-z]+|[^\sA-Za-z\d]")
ARITH = re.compile(r"^[\d+\-() ]+$")
STEP_HEADER = re.compile(r"^step \d+: -?\d+[+-]\d+$")


def _units(completion: str) -> list[str]:
    return UNIT.findall(completion.replace("<think>", "").replace("</think>", ""))


def _expression(prompt: str) -> str:
    assert prompt.startswith("Compute ") and prompt.endswith(".")
    return prompt[len("Compute "):-1]


def _check_line(line: str) -> None:
    """A trace line is an optional ``label:`` then a true chain ``x=y(=z)``."""
    if STEP_HEADER.match(line):
        return
    body = re.sub(r"^[A-Za-z][A-Za-z -]*:\s*", "", line)
    equation, _, note = body.partition(", ")
    sides = equation.split("=")
    assert len(sides) >= 2, line
    for side in sides:
        assert ARITH.match(side), line
    values = {eval(side) for side in sides}  # noqa: S307 - guarded by ARITH
    assert len(values) == 1, line
    if note in ("", "ok"):
        return
    written = re.match(r"write (\d+)( carry 1| borrow 1)?$", note)
    assert written, line
    total = values.pop()
    if written.group(2) == " carry 1":
        assert int(written.group(1)) == total % 10 and total >= 10, line
    else:
        assert int(written.group(1)) == total, line


def test_problem_answer_and_validation():
    assert Problem((23, 45, 12), ("+", "-")).answer == 56
    assert Problem((3, 7), ("-",)).answer == -4
    with pytest.raises(ValueError, match="operators"):
        Problem((1, 2), ("*",))
    with pytest.raises(ValueError, match="operands"):
        Problem((1,), ())


def test_render_prompt_and_completion_format():
    problem = Problem((23, 45, 12), ("+", "-"))
    assert render_prompt(problem) == "Compute 23 + 45 - 12."
    completion = render_completion(problem, "concise")
    assert completion.startswith("<think>\n")
    assert completion.endswith("\n</think>\nThe answer is 56.")
    assert render_thinking(Problem((47, 38), ("+",))) == "7+8=15, write 5 carry 1\n4+3+1=8, write 8\n47+38=85"


def test_determinism_and_seeds():
    task = ReasoningTask(num_train=50, num_val=20, style="mixed", noise=0.1)
    assert task.records("train") == ReasoningTask(num_train=50, num_val=20, style="mixed", noise=0.1).records("train")
    reseeded = ReasoningTask(num_train=50, num_val=20, seed=1, style="mixed", noise=0.1)
    assert task.records("train") != reseeded.records("train")
    assert generate_problems(30, seed=5) == generate_problems(30, seed=5)
    assert generate_problems(30, seed=5) != generate_problems(30, seed=6)


def test_splits_use_different_streams():
    task = ReasoningTask.preset("medium", num_train=100, num_val=100)
    train, val = task.problems("train"), task.problems("val")
    assert len(train) == len(val) == 100
    assert train != val
    with pytest.raises(ValueError, match="split"):
        task.problems("test")


def _from_words(line: str) -> str:
    """A ``words`` line back in symbols, written independently of the renderer."""
    return line.replace("negative ", "-").replace(" minus ", "-").replace(" plus ", "+").replace(" is ", "=")


@pytest.mark.parametrize("preset", ["easy", "medium", "hard"])
@pytest.mark.parametrize("style", ["concise", "verbose", "words"])
def test_answers_and_every_trace_line_are_true(preset, style):
    task = ReasoningTask.preset(preset, num_train=150, style=style)
    for problem, record in zip(task.problems("train"), task.records("train")):
        expected = eval(_expression(record["prompt"]))  # noqa: S307 - generated text
        assert problem.answer == expected
        assert record["answer"] == str(expected)
        assert check_answer(record["completion"], expected)
        for line in render_thinking(problem, style).split("\n"):
            _check_line(_from_words(line) if style == "words" else line)
        if style == "words":
            assert not any(ch in render_thinking(problem, style) for ch in "+=")


def test_negative_running_values_are_handled():
    for problem in [Problem((3, 7, 20), ("-", "-")), Problem((5, 90, 60), ("-", "+")), Problem((5, 9, 4), ("-", "+"))]:
        for style in ("concise", "verbose", "words"):
            for line in render_thinking(problem, style).split("\n"):
                _check_line(_from_words(line) if style == "words" else line)
            assert extract_answer(render_completion(problem, style)) == str(problem.answer)
    assert render_thinking(Problem((5, 90, 60), ("-", "+")), "words").split("\n")[0] == \
        "5 minus 90 is negative (90 minus 5)"


def test_presets_bounds():
    hard = ReasoningTask.preset("hard", num_train=200, seed=3)
    assert hard.seed == 3
    for problem in hard.problems("train"):
        assert 3 <= len(problem.operands) <= 5
        assert all(100 <= value <= 9999 for value in problem.operands)
    with pytest.raises(ValueError, match="preset"):
        ReasoningTask.preset("impossible")


def test_verbose_is_longer_with_same_answer():
    for problem in generate_problems(100, seed=1, max_digits=3, max_operands=4):
        concise, verbose = render_completion(problem, "concise"), render_completion(problem, "verbose")
        assert len(verbose) > len(concise)
        assert len(verbose.split("\n")) > len(concise.split("\n"))
        assert extract_answer(concise) == extract_answer(verbose) == str(problem.answer)


def test_mixed_style_uses_both():
    completions = [r["completion"] for r in ReasoningTask(num_train=100, style="mixed").records("train")]
    verbose = sum("check:" in c for c in completions)
    assert 20 < verbose < 80


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\n1+2=3\n</think>\nThe answer is 3.", "3"),
        ("<think>\n1-5=-4\n</think>\nThe answer is -4.", "-4"),
        ("<think>\n1+2=3\n</think>\nThe answer is 3. Easy, took 2 steps.", "3"),
        ("<think>\nThe answer is 7.\n</think>\nThe answer is 8.", "8"),
        ("<think>\nx\n</think>\n 42", "42"),
        ("<think>\n1+2=3\nThe answer is 3.", None),
        ("The answer is 3.", None),
        ("<think>\n1+2=3\n</think>\nThe answer is unclear.", None),
        ("<think>a</think>x</think>The answer is 5.", "5"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_check_answer():
    text = "<think>\n2-9=-7\n</think>\nThe answer is -7."
    assert check_answer(text, -7) and check_answer(text, "-7")
    assert not check_answer(text, 7)
    assert not check_answer("no thinking, the answer is -7.", -7)


def test_thinking_length():
    assert thinking_length([1, 5, 9, 9, 9, 6, 3], think_start_id=5, think_end_id=6) == 3
    assert thinking_length([5, 9, 9], think_start_id=5, think_end_id=6) == 2
    assert thinking_length([9, 9, 6], think_start_id=5, think_end_id=6) == 0
    assert thinking_length([5, 6, 5, 9, 6], think_start_id=5, think_end_id=6) == 0


def test_render_corpus():
    problems = generate_problems(3, seed=0)
    corpus = render_corpus(problems)
    docs = corpus.split("\n\n")
    assert len(docs) == 3
    assert docs[0] == render_prompt(problems[0]) + "\n" + render_completion(problems[0], "concise")
    assert ReasoningTask(num_train=3).corpus("train").count("Compute") == 3


def test_noise_zero_leaves_text_unchanged():
    clean = ReasoningTask(num_train=50).records("train")
    assert ReasoningTask(num_train=50, noise=0.0, noisy_fraction=1.0).records("train") == clean
    text = "<think>\n7+8=15, write 5\n</think>\nThe answer is 15."
    assert corrupt_text(text, 0.0, random.Random(0)) == text


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_noise_fraction_matches_request(noise):
    kwargs = dict(num_train=300, style="mixed", max_digits=3, max_operands=3)
    clean = ReasoningTask(**kwargs).records("train")
    noisy = ReasoningTask(**kwargs, noise=noise).records("train")
    changed = total = 0
    for a, b in zip(clean, noisy):
        assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
        assert b["completion"].startswith("<think>\n") and b["completion"].count("</think>") == 1
        units_a, units_b = _units(a["completion"]), _units(b["completion"])
        assert len(units_a) == len(units_b)
        changed += sum(x != y for x, y in zip(units_a, units_b))
        total += len(units_a)
    assert changed / total == pytest.approx(noise, abs=0.01)


def test_noise_replaces_units_with_same_class():
    text = "<think>\nunits: 7+8=15, write 5 carry 1\n</think>\nThe answer is 15."
    for seed in range(20):
        out = corrupt_text(text, 0.5, random.Random(seed))
        assert out.startswith("<think>\n") and "\n</think>\n" in out
        for before, after in zip(_units(text), _units(out)):
            same_class = (before.isdigit() and after.isdigit()) or (before.isalpha() and after.isalpha())
            assert same_class or (not before.isalnum() and after in "+-=,.:")


def test_noisy_fraction_and_val_never_noisy():
    kwargs = dict(num_train=200, num_val=50)
    clean = ReasoningTask(**kwargs)
    noisy = ReasoningTask(**kwargs, noise=0.5, noisy_fraction=0.25)
    differing = sum(a != b for a, b in zip(clean.records("train"), noisy.records("train")))
    assert differing == pytest.approx(50, abs=2)
    assert noisy.records("val") == clean.records("val")
    assert all(check_answer(r["completion"], r["answer"]) for r in ReasoningTask(noise=0.9, num_train=0).records("val"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise": 1.5}, "noise"),
        ({"noise": 1.0}, "noise"),
        ({"noisy_fraction": -0.1}, "noisy_fraction"),
        ({"style": "chatty"}, "style"),
        ({"min_digits": 0}, "min_digits"),
        ({"min_digits": 3, "max_digits": 2}, "max_digits"),
        ({"min_operands": 1}, "min_operands"),
        ({"min_operands": 3, "max_operands": 2}, "max_operands"),
        ({"num_train": -1}, "num_train"),
        ({"num_val": 2.5}, "num_val"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"ReasoningTask\.{field} must be"):
        ReasoningTask(**kwargs)


def test_noise_error_message():
    with pytest.raises(ValueError, match=re.escape("ReasoningTask.noise must be in [0, 1), got 1.5")):
        ReasoningTask(noise=1.5)
