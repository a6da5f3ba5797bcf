"""The reasoning-trace conventions (lightning_tokens/reasoning.py): one home, used by the toy task and the methods."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_tokens
import lightning_tokens.data.reasoning_task as task
import lightning_tokens.data.tokenizer as task_tokenizer
from lightning_tokens import reasoning

PACKAGE = Path(lightning_tokens.__file__).parent
CONVENTIONS = ("THINK_START", "THINK_END", "extract_answer", "check_answer", "is_correct", "thinking_length")


@pytest.mark.parametrize("name", CONVENTIONS)
def test_the_old_import_paths_give_the_same_objects(name):
    assert getattr(task, name) is getattr(reasoning, name)
    if name in ("THINK_START", "THINK_END"):
        assert getattr(task_tokenizer, name) is getattr(reasoning, name)
    if name in lightning_tokens.__all__:
        assert getattr(lightning_tokens, name) is getattr(reasoning, name)


def test_the_exported_names_are_unchanged():
    assert {"check_answer", "extract_answer", "ReasoningTask"} <= set(lightning_tokens.__all__)


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from module import name`` in ``path``, function-level imports included."""
    tree = ast.parse(path.read_text())
    return [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
            for alias in node.names]


def test_reasoning_depends_on_nothing_in_the_package():
    assert [module for module, _ in _imports(PACKAGE / "reasoning.py") if module.startswith("lightning_tokens")] == []


def test_no_module_takes_the_conventions_from_the_toy_task():
    offenders = [f"{path.relative_to(PACKAGE)}: {name}" for path in sorted(PACKAGE.rglob("*.py"))
                 for module, name in _imports(path)
                 if module == "lightning_tokens.data.reasoning_task" and name in CONVENTIONS]
    assert offenders == []


@pytest.mark.parametrize("style", ["concise", "verbose", "words"])
def test_the_task_writes_responses_the_conventions_read(style, tokenizer):
    records = task.ReasoningTask(num_train=20, num_val=0, seed=3, max_operands=3, style=style).records("train")
    for record in records:
        expression = record["prompt"].removeprefix("Compute ").removesuffix(".")
        expected = eval(expression)  # only + and -: Python evaluates left to right, as the task does
        assert reasoning.check_answer(record["completion"], expected)
        assert not reasoning.check_answer(record["completion"], expected + 1)
        ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        inner = record["completion"].split(reasoning.THINK_START, 1)[1].split(reasoning.THINK_END, 1)[0]
        start, end = (tokenizer.convert_tokens_to_ids(t) for t in (reasoning.THINK_START, reasoning.THINK_END))
        inner_ids = tokenizer(inner, add_special_tokens=False)["input_ids"]
        assert reasoning.thinking_length(ids, start, end) == len(inner_ids)
