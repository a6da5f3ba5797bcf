"""Embedded reasoning task: seeded multi-digit addition/subtraction problems.

Every problem is an expression such as ``23 + 45 - 12`` evaluated left to
right. Its completion is a step-by-step thinking trace wrapped in
``<think>`` / ``</think>`` followed by ``The answer is 56.``. The trace
has one step per line: each binary operation is solved column by column
(units, tens, ...) with carries and borrows written out, then the
intermediate result is stated. The ``verbose`` style adds a header per
operation, names the columns, re-checks every result and restates the
final result, so it is clearly longer than ``concise`` for the same problem.

Example (concise, ``47 + 38``)::

    <think>
    7+8=15, write 5 carry 1
    4+3+1=8, write 8
    47+38=85
    </think>
    The answer is 85.

Everything is deterministic given the seed: train and validation splits use
independent random streams derived from ``(seed, split)``.
"""

from __future__ import annotations

import hashlib
import random
import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterable, Sequence

from lightning_tokens.checks import check_numbers
from lightning_tokens.reasoning import THINK_END, THINK_START, check_answer, extract_answer, is_correct, thinking_length

__all__ = [  # the trace conventions are re-exported: code written against 0.1 imports them from here
    "PRESETS", "SPLITS", "STYLES", "THINK_END", "THINK_START", "Problem", "ReasoningTask", "check_answer",
    "corrupt_text", "extract_answer", "generate_problems", "is_correct", "render_answer", "render_completion",
    "render_corpus", "render_prompt", "render_thinking", "thinking_length",
]

STYLES = ("concise", "verbose", "words", "mixed")
SPLITS = ("train", "val")
PRESETS: dict[str, dict[str, int]] = {
    "easy": {"min_digits": 1, "max_digits": 2, "min_operands": 2, "max_operands": 2},
    "medium": {"min_digits": 2, "max_digits": 3, "min_operands": 2, "max_operands": 3},
    "hard": {"min_digits": 3, "max_digits": 4, "min_operands": 3, "max_operands": 5},
}

_COLUMN_NAMES = ("units", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
_UNIT_SPLIT_RE = re.compile(r"(\d|[A-Za-z]+|[^\sA-Za-z\d])")
_MARKER_RE = re.compile(f"({re.escape(THINK_START)}|{re.escape(THINK_END)})")
_NOISE_DIGITS = "0123456789"
_NOISE_SYMBOLS = "+-=,.:"
_NOISE_WORDS = (
    "write", "carry", "borrow", "check", "ok", "step", "result",
    "units", "tens", "the", "answer", "is", "so", "add", "minus",
)


@dataclass(frozen=True)
class Problem:
    """An arithmetic expression evaluated left to right.

    Args:
        operands: Non-negative integers, at least two.
        operators: ``"+"`` or ``"-"`` between consecutive operands, so
            ``len(operators) == len(operands) - 1``.
    """

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.operands) < 2:
            raise ValueError(f"Problem.operands needs at least 2 values, got {self.operands}")
        if len(self.operators) != len(self.operands) - 1:
            raise ValueError(
                f"Problem.operators needs {len(self.operands) - 1} entries, got {self.operators}"
            )
        if any(op not in ("+", "-") for op in self.operators):
            raise ValueError(f"Problem.operators must be '+' or '-', got {self.operators}")
        if any(value < 0 for value in self.operands):
            raise ValueError(f"Problem.operands must be non-negative, got {self.operands}")

    @property
    def answer(self) -> int:
        """The value of the expression, evaluated left to right."""
        value = self.operands[0]
        for op, operand in zip(self.operators, self.operands[1:]):
            value = value + operand if op == "+" else value - operand
        return value

    def expression(self, sep: str = " ") -> str:
        """The expression as text, e.g. ``"23 + 45 - 12"``.

        Args:
            sep: Separator placed around every operator. Defaults to ``" "``.
        """
        parts = [str(self.operands[0])]
        for op, operand in zip(self.operators, self.operands[1:]):
            parts.append(f"{sep}{op}{sep}{operand}")
        return "".join(parts)


# ---------------------------------------------------------------- generation


def _derived_seed(*parts: object) -> int:
    """A stable 64-bit seed from ``parts`` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _random_operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def generate_problems(
    n: int,
    seed: int = 0,
    min_digits: int = 1,
    max_digits: int = 2,
    min_operands: int = 2,
    max_operands: int = 2,
) -> list[Problem]:
    """Draw ``n`` random problems deterministically from ``seed``.

    Each problem draws its operand count uniformly in
    ``[min_operands, max_operands]``, each operand's digit count uniformly in
    ``[min_digits, max_digits]`` and each operator uniformly from ``+``/``-``.

    Args:
        n: Number of problems.
        seed: Seed of the random stream. Defaults to ``0``.
        min_digits: Fewest digits of an operand. Defaults to ``1``.
        max_digits: Most digits of an operand. Defaults to ``2``.
        min_operands: Fewest operands of a problem (at least 2). Defaults to ``2``.
        max_operands: Most operands of a problem. Defaults to ``2``.

    Returns:
        The list of problems.
    """
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        count = rng.randint(min_operands, max_operands)
        operands = tuple(_random_operand(rng, rng.randint(min_digits, max_digits)) for _ in range(count))
        operators = tuple(rng.choice("+-") for _ in range(count - 1))
        problems.append(Problem(operands, operators))
    return problems


# ---------------------------------------------------------------- rendering


def _column_prefix(index: int, verbose: bool) -> str:
    if not verbose:
        return ""
    name = _COLUMN_NAMES[index] if index < len(_COLUMN_NAMES) else f"column {index + 1}"
    return f"{name}: "


def _digits(value: int) -> list[int]:
    """Decimal digits of a non-negative integer, units first."""
    return [int(ch) for ch in reversed(str(value))]


def _add_lines(a: int, b: int, verbose: bool) -> list[str]:
    """Column-wise addition ``a + b`` of non-negative integers."""
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    lines = []
    if width > 1 or verbose:
        carry = 0
        for i in range(width):
            x = da[i] if i < len(da) else 0
            y = db[i] if i < len(db) else 0
            total = x + y + carry
            expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
            if i == width - 1:
                step = f"{expr}={total}, write {total}"
            else:
                step = f"{expr}={total}, write {total % 10}" + (" carry 1" if total >= 10 else "")
            lines.append(_column_prefix(i, verbose) + step)
            carry = total // 10
    lines.append(f"{a}+{b}={a + b}")
    return lines


def _sub_lines(a: int, b: int, verbose: bool) -> list[str]:
    """Column-wise subtraction ``a - b`` of integers with ``a >= b >= 0``."""
    da, db = _digits(a), _digits(b)
    lines = []
    if len(da) > 1 or verbose:
        borrow = 0
        for i, x in enumerate(da):
            y = db[i] if i < len(db) else 0
            needs_borrow = x - borrow < y
            top = x + 10 if needs_borrow else x
            expr = f"{top}" + (f"-{borrow}" if borrow else "") + f"-{y}"
            step = f"{expr}={top - borrow - y}, write {top - borrow - y}"
            lines.append(_column_prefix(i, verbose) + step + (" borrow 1" if needs_borrow else ""))
            borrow = int(needs_borrow)
    lines.append(f"{a}-{b}={a - b}")
    return lines


def _operation_lines(a: int, op: str, b: int, verbose: bool) -> list[str]:
    """Lines solving ``a op b`` where ``a`` may be negative and ``b >= 0``."""
    result = a + b if op == "+" else a - b
    head = f"{a}{op}{b}"
    if op == "+" and a >= 0:
        lines = _add_lines(a, b, verbose)
    elif op == "+" and b >= -a:
        lines = [f"{head}={b}-{-a}"] + _sub_lines(b, -a, verbose) + [f"{head}={result}"]
    elif op == "+":
        lines = [f"{head}=-({-a}-{b})"] + _sub_lines(-a, b, verbose) + [f"{head}={result}"]
    elif a >= b:
        lines = _sub_lines(a, b, verbose)
    elif a >= 0:
        lines = [f"{head}=-({b}-{a})"] + _sub_lines(b, a, verbose) + [f"{head}={result}"]
    else:
        lines = [f"{head}=-({-a}+{b})"] + _add_lines(-a, b, verbose) + [f"{head}={result}"]
    if verbose:
        inverse = f"{result}-{b}" if op == "+" else f"{result}+{b}"
        lines.append(f"check: {inverse}={a}, ok")
    return lines


def render_prompt(problem: Problem) -> str:
    """The user prompt of a problem, e.g. ``"Compute 23 + 45 - 12."``.

    Args:
        problem: The problem to render.
    """
    return f"Compute {problem.expression()}."


def render_thinking(problem: Problem, style: str = "concise") -> str:
    """The step-by-step thinking trace (without the think markers).

    Args:
        problem: The problem to solve.
        style: ``"concise"``, ``"verbose"`` or ``"words"`` (the concise steps with the operators spelled out:
            ``5 plus 1 is 6, write 6``; ``mixed`` never picks it, so a model trained on mixed data has not seen
            it). Defaults to ``"concise"``.

    Returns:
        The trace, one step per line, without a trailing newline.
    """
    if style not in ("concise", "verbose", "words"):
        raise ValueError(f"style must be 'concise', 'verbose' or 'words', got {style!r}")
    if style == "words":
        return "\n".join(_in_words(line) for line in render_thinking(problem, "concise").split("\n"))
    verbose = style == "verbose"
    lines: list[str] = []
    value = problem.operands[0]
    for index, (op, operand) in enumerate(zip(problem.operators, problem.operands[1:]), start=1):
        if verbose:
            lines.append(f"step {index}: {value}{op}{operand}")
        lines.extend(_operation_lines(value, op, operand, verbose))
        value = value + operand if op == "+" else value - operand
    if verbose:
        lines.append(f"result: {problem.expression('')}={value}")
    return "\n".join(lines)


def _in_words(line: str) -> str:
    """A concise step with its operators spelled out: ``-(5-2)=-3`` -> ``negative (5 minus 2) is negative 3``."""
    out = []
    for i, ch in enumerate(line):
        if ch == "-":
            unary = i == 0 or line[i - 1] in "=("
            out.append("negative " if unary else " minus ")
        else:
            out.append({"+": " plus ", "=": " is "}.get(ch, ch))
    return "".join(out)


def render_answer(answer: int | str) -> str:
    """The final answer sentence, e.g. ``"The answer is 56."``.

    Args:
        answer: The answer to state.
    """
    return f"The answer is {answer}."


def render_completion(problem: Problem, style: str = "concise") -> str:
    """The full assistant response: thinking block then the answer sentence.

    Args:
        problem: The problem to solve.
        style: ``"concise"``, ``"verbose"`` or ``"words"``. Defaults to ``"concise"``.
    """
    thinking = render_thinking(problem, style)
    return f"{THINK_START}\n{thinking}\n{THINK_END}\n{render_answer(problem.answer)}"


def render_corpus(problems: Iterable[Problem], style: str = "concise", seed: int = 0) -> str:
    """Plain text for continued pretraining: prompt and completion per problem.

    Args:
        problems: Problems to render.
        style: ``"concise"``, ``"verbose"``, ``"words"`` or ``"mixed"`` (a seeded
            random choice of concise or verbose per problem). Defaults to ``"concise"``.
        seed: Seed of the style choice when ``style="mixed"``. Defaults to ``0``.

    Returns:
        The documents separated by a blank line.
    """
    rng = random.Random(_derived_seed(seed, "corpus", "style"))
    docs = [
        f"{render_prompt(p)}\n{render_completion(p, _pick_style(style, rng))}" for p in problems
    ]
    return "\n\n".join(docs)


def _pick_style(style: str, rng: random.Random) -> str:
    if style == "mixed":
        return rng.choice(("concise", "verbose"))
    return style


# ---------------------------------------------------------------- noise


def _replacement(unit: str, rng: random.Random) -> str:
    if unit.isdigit():
        pool: Sequence[str] = _NOISE_DIGITS
    elif unit.isalpha():
        pool = _NOISE_WORDS
    else:
        pool = _NOISE_SYMBOLS
    while True:
        candidate = pool[int(rng.random() * len(pool))]
        if candidate != unit:
            return candidate


def corrupt_text(text: str, fraction: float, rng: random.Random) -> str:
    """Replace a ``fraction`` of the text's units by different units of the same class.

    Units are matched by ``\\d|[A-Za-z]+|[^\\sA-Za-z\\d]``; a digit becomes a
    different digit, a word a different word from a small list, a symbol a
    different symbol among ``+-=,.:``. ``<think>``/``</think>`` markers are
    never touched. The number of replaced units is ``fraction * n`` rounded
    stochastically, so the expected corrupted fraction is exactly ``fraction``.

    Args:
        text: Text to corrupt.
        fraction: Fraction of units to replace, in ``[0, 1]``.
        rng: Random source (the result is deterministic given its state).

    Returns:
        The corrupted text (``text`` itself when nothing is replaced).
    """
    segments = _MARKER_RE.split(text)
    # Splitting on a capturing group puts the units at the odd indices.
    split = [
        [segment] if segment in (THINK_START, THINK_END) else _UNIT_SPLIT_RE.split(segment)
        for segment in segments
    ]
    counts = [len(parts) // 2 if len(parts) > 1 else 0 for parts in split]
    offsets = list(accumulate(counts))
    exact = fraction * offsets[-1]
    count = int(exact) + (rng.random() < exact - int(exact))
    if count == 0:
        return text
    for unit_index in rng.sample(range(offsets[-1]), count):
        segment = bisect_right(offsets, unit_index)
        local = unit_index - (offsets[segment - 1] if segment else 0)
        parts = split[segment]
        parts[2 * local + 1] = _replacement(parts[2 * local + 1], rng)
    return "".join("".join(parts) for parts in split)


# ---------------------------------------------------------------- config object


@dataclass
class ReasoningTask:
    """Configuration of the embedded reasoning task (buildable from YAML).

    Args:
        num_train: Number of training problems. Defaults to ``8000``.
        num_val: Number of validation problems. Defaults to ``200``.
        seed: Seed of all random streams. Defaults to ``0``.
        min_digits: Fewest digits of an operand. Defaults to ``1``.
        max_digits: Most digits of an operand. Defaults to ``2``.
        min_operands: Fewest operands per problem (at least 2). Defaults to ``2``.
        max_operands: Most operands per problem. Defaults to ``2``.
        style: Thinking style: ``"concise"``, ``"verbose"``, ``"words"`` (operators spelled out) or
            ``"mixed"`` (seeded random choice of concise or verbose per problem). Defaults to ``"concise"``.
        noise: Fraction of response units corrupted in a noisy training
            record, in ``[0, 1)``. Defaults to ``0.0``.
        noisy_fraction: Fraction of training records that receive noise, in
            ``[0, 1]``; validation records are never noisy. Defaults to ``1.0``.
    """

    num_train: int = 8000
    num_val: int = 200
    seed: int = 0
    min_digits: int = 1
    max_digits: int = 2
    min_operands: int = 2
    max_operands: int = 2
    style: str = "concise"
    noise: float = 0.0
    noisy_fraction: float = 1.0

    def __post_init__(self) -> None:
        def fail(field: str, rule: str) -> None:
            value = getattr(self, field)
            raise ValueError(f"ReasoningTask.{field} must be {rule}, got {value!r}")

        check_numbers("ReasoningTask", num_train=(self.num_train, "an integer >= 0"),
                      num_val=(self.num_val, "an integer >= 0"), seed=(self.seed, "an integer"),
                      min_digits=(self.min_digits, "an integer >= 1"), max_digits=(self.max_digits, "an integer"),
                      min_operands=(self.min_operands, "an integer >= 2"),
                      max_operands=(self.max_operands, "an integer"), noise=(self.noise, "in [0, 1)"),
                      noisy_fraction=(self.noisy_fraction, "in [0, 1]"))
        if self.max_digits < self.min_digits:
            fail("max_digits", f">= min_digits ({self.min_digits})")
        if self.max_operands < self.min_operands:
            fail("max_operands", f">= min_operands ({self.min_operands})")
        if self.style not in STYLES:
            fail("style", f"one of {', '.join(STYLES)}")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> "ReasoningTask":
        """A task with a named difficulty preset.

        Args:
            name: ``"easy"`` (1-2 digits, 2 operands), ``"medium"`` (2-3
                digits, 2-3 operands) or ``"hard"`` (3-4 digits, 3-5 operands).
            **overrides: Any other field (or a preset field) to set.

        Returns:
            The configured task.
        """
        if name not in PRESETS:
            raise ValueError(f"ReasoningTask.preset name must be one of {', '.join(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def problems(self, split: str) -> list[Problem]:
        """The problems of a split (independent random stream per split).

        Args:
            split: ``"train"`` or ``"val"``.
        """
        self._check_split(split)
        return generate_problems(
            self.num_train if split == "train" else self.num_val,
            seed=_derived_seed(self.seed, split, "problems"),
            min_digits=self.min_digits,
            max_digits=self.max_digits,
            min_operands=self.min_operands,
            max_operands=self.max_operands,
        )

    def records(self, split: str) -> list[dict[str, str]]:
        """Prompt/completion records of a split.

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            Dicts with ``"prompt"``, ``"completion"`` (possibly noisy for
            training) and ``"answer"`` (always the true answer as a string).
        """
        problems = self.problems(split)
        style_rng = random.Random(_derived_seed(self.seed, split, "style"))
        noise_rng = random.Random(_derived_seed(self.seed, split, "noise"))
        noisy: set[int] = set()
        if split == "train" and self.noise > 0:
            noisy = set(noise_rng.sample(range(len(problems)), round(self.noisy_fraction * len(problems))))
        records = []
        for index, problem in enumerate(problems):
            completion = render_completion(problem, _pick_style(self.style, style_rng))
            if index in noisy:
                completion = corrupt_text(completion, self.noise, noise_rng)
            records.append(
                {"prompt": render_prompt(problem), "completion": completion, "answer": str(problem.answer)}
            )
        return records

    def corpus(self, split: str) -> str:
        """The split rendered as plain text for continued pretraining (no noise).

        Args:
            split: ``"train"`` or ``"val"``.
        """
        return render_corpus(self.problems(split), self.style, seed=_derived_seed(self.seed, split))
