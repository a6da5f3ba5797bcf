"""One clear error for a numeric argument out of range (lightning_tokens/checks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_tokens.checks import check_numbers

# (value, rule, accepted), each decided by reading the rule as a sentence.
CASES = [
    (1, "an integer >= 1", True), (0, "an integer >= 1", False), (np.int64(3), "an integer >= 1", True),
    (True, "an integer >= 0", False), (2.0, "an integer >= 0", False), (-1, "an integer", True),
    (None, "an integer >= 0 or None", True), (None, "an integer >= 0", False),
    (0.5, "> 0", True), (0.0, "> 0", False), (0.0, ">= 0", True), (-1e-9, ">= 0", False),
    (1, "< 1", False), (0.999, "< 1", True), (1, "<= 1", True), (False, "a number", False),
    (0.0, "in [0, 1)", True), (1.0, "in [0, 1)", False), (0.0, "in (0, 1]", False), (1.0, "in (0, 1]", True),
    (0.5, "in (0, 1)", True), (2, "in [0, 1]", False), ("1", "a number", False),
]


@pytest.mark.parametrize("value,rule,accepted", CASES, ids=[f"{v!r} {r}" for v, r, _ in CASES])
def test_each_rule_accepts_and_refuses_what_it_says(value, rule, accepted):
    if accepted:
        check_numbers("Owner", field=(value, rule))
    else:
        with pytest.raises(ValueError) as error:
            check_numbers("Owner", field=(value, rule))
        assert str(error.value) == f"Owner.field must be {rule}, got {value!r}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_infinity_are_refused_as_not_finite(value):
    with pytest.raises(ValueError) as error:
        check_numbers("Owner", rate=(value, ">= 0 or None"))
    assert str(error.value) == f"Owner.rate must be a finite number, got {value!r}"


def test_the_first_bad_field_in_order_is_named():
    with pytest.raises(ValueError, match=r"^Owner\.second must be an integer >= 1, got 0$"):
        check_numbers("Owner", first=(1, "an integer >= 1"), second=(0, "an integer >= 1"), third=(-1, "> 0"))
