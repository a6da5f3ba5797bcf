"""Trained-row thresholds of budget guidance (budget/calibration.py) against an independent computation."""

import math
import random

import pytest
import torch

from lightning_tokens.budget import calibrate_thresholds


def _lower_quantile(values, q):
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def _sample(n=400, seed=0):
    rng = random.Random(seed)
    alpha = [rng.uniform(0.5, 6.0) for _ in range(n)]
    rate = [rng.uniform(0.2, 3.0) for _ in range(n)]
    length = [rng.randint(1, 80) for _ in range(n)]
    return alpha, rate, length


def _expected(alpha, rate, length, q, window):
    mode = [math.exp(max(a - 1, 0) / r) - 1 for a, r in zip(alpha, rate)]
    accurate = [i for i in range(len(alpha)) if abs(mode[i] - length[i]) <= window]
    assert 20 < len(accurate) < len(alpha)  # the filter matters in this sample
    return {key: _lower_quantile([values[i] for i in accurate], q)
            for key, values in (("min_rate", rate), ("min_shape", alpha), ("min_mode", mode))}, accurate


def test_bare_thresholds_are_lower_quantiles_over_accurate_positions():
    alpha, rate, length = _sample()
    expected, accurate = _expected(alpha, rate, length, 0.1, 10)
    got = calibrate_thresholds(torch.tensor(alpha), torch.tensor(rate), torch.tensor(length, dtype=torch.float32),
                               quantile=0.1, window=10, ceiling={})
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert sum(rate[i] >= got["min_rate"] for i in accurate) / len(accurate) >= 0.9


def test_default_caps_each_threshold_at_the_reference():
    alpha, rate, length = _sample()
    expected, _ = _expected(alpha, rate, length, 0.1, 10)
    got = calibrate_thresholds(torch.tensor(alpha), torch.tensor(rate), torch.tensor(length, dtype=torch.float32),
                               quantile=0.1, window=10)
    reference = {"min_rate": 10.0, "min_shape": 1.0, "min_mode": 0.9}
    for key in expected:
        assert got[key] == pytest.approx(min(expected[key], reference[key]), rel=1e-5), key
    assert got["min_rate"] < 10.0  # this sample's rates are all below the reference's


def test_no_accurate_position_uses_every_position():
    alpha, rate, _ = _sample(50, seed=1)
    far = torch.full((50,), 1e6)
    got = calibrate_thresholds(torch.tensor(alpha), torch.tensor(rate), far, quantile=0.0, ceiling={})
    assert got["min_rate"] == pytest.approx(min(rate), rel=1e-6)
    assert got["min_shape"] == pytest.approx(min(alpha), rel=1e-6)


def test_bad_arguments():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_thresholds(x, x, x, quantile=1.0)
    with pytest.raises(ValueError, match="equal size"):
        calibrate_thresholds(x, x, torch.ones(2))
