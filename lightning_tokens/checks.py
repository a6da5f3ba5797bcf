"""One clear error for a numeric argument out of range, naming its owner and field.

Every public class and function checks its numeric arguments where they are given, so that a bad value
ends in ``"SFTDataModule.batch_size must be an integer >= 1, got 0"`` (one line from ``lightning-tokens``)
instead of a traceback from deep inside PyTorch or transformers.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

_COMPARISONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check_numbers(owner: str, **fields: tuple[Any, str]) -> None:
    """Raise ``ValueError("<owner>.<name> must be <rule>, got <value>")`` for the first field outside its rule.

    A rule is written as the error message reads: ``"an integer"`` (an ``int``, never a ``bool``) or, without
    that prefix, a finite real number (never a ``bool``); then optionally a bound, ``">= 1"`` (also ``>``,
    ``<``, ``<=``) or an interval ``"in (0, 1]"``; then optionally ``" or None"`` when ``None`` is allowed.
    Examples: ``"an integer >= 1"``, ``"an integer >= 0 or None"``, ``"in [0, 1)"``, ``"> 0"``, ``"a number"``.

    Args:
        owner: The class or function the fields belong to, e.g. ``"SFTDataModule"``.
        **fields: ``name=(value, rule)`` for each field, checked in order.

    Raises:
        ValueError: The first field whose value breaks its rule, named ``owner.name``.
    """
    for name, (value, rule) in fields.items():
        if rule.endswith(" or None") and value is None:
            continue
        rule_text, rule = rule, rule.removesuffix(" or None")
        integer = rule.startswith("an integer")
        if not integer and _is_real(value) and not math.isfinite(value):
            raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
        if not (_is_integer(value) if integer else _is_real(value)) or not _in_bounds(value, rule):
            raise ValueError(f"{owner}.{name} must be {rule_text}, got {value!r}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _in_bounds(value: float, rule: str) -> bool:
    bound = rule.removeprefix("an integer").removeprefix("a number").strip()
    if not bound:
        return True
    if bound.startswith("in "):  # "in [0, 1)": brackets include the end, parentheses leave it out
        low, high = (float(end) for end in bound[4:-1].split(", "))
        above = value >= low if bound[3] == "[" else value > low
        return above and (value <= high if bound[-1] == "]" else value < high)
    comparison, limit = bound.split(" ")
    return _COMPARISONS[comparison](value, float(limit))
