"""schedule_value: every schedule's weight against its formula, and bad names or ratios."""

from __future__ import annotations

import math

import pytest

from lightning_tokens.caft import schedule_value


def test_schedule_values():
    for p in [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]:
        assert schedule_value("rsine", p) == pytest.approx(math.sin(math.pi / 2 * (1 - p)))
        assert schedule_value("sine", p) == pytest.approx(math.sin(math.pi / 2 * p))
        assert schedule_value("linear", p) == pytest.approx(p)
        assert schedule_value("constant", p) == 1.0
        expected = math.sin(math.pi / 2 * p / 0.3) if p < 0.3 else 1.0
        assert schedule_value("sine_r", p, sine_ratio=0.3) == pytest.approx(expected)
        assert schedule_value("sine_0.3", p) == pytest.approx(expected)
    assert schedule_value("rsine", 0.0) == 1.0 and schedule_value("rsine", 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        schedule_value("cosine", 0.5)
    with pytest.raises(ValueError, match="sine_ratio"):
        schedule_value("sine_r", 0.5, sine_ratio=0.0)
