"""The runaway-selection detector (sstoken/runaway.py) alone, on synthetic per-step losses: a loop fires at the step
the rule first holds (worked out by hand below), healthy sequences never fire, and its state resumes exactly."""

from __future__ import annotations

import io
import random

import pytest
import torch

from lightning_tokens.sstoken.runaway import RunawayDetector


def feed(detector, kept, dropped, first_step=1):
    """The steps at which ``detector`` fires over the sequences."""
    return [step for step, k, d in zip(range(first_step, first_step + len(kept)), kept, dropped)
            if detector.update(step, k, d)]


def test_a_jump_of_the_dropped_loss_fires_once_the_window_mean_reaches_the_rise():
    # baseline (steps 1-4): kept 2, dropped 2; then dropped 5, kept 1.5. Mean dropped over the last 4 steps:
    # step 5: (3 * 2 + 5) / 4 = 2.75 < 3 = 1.5 * 2; step 6: (2 * 2 + 2 * 5) / 4 = 3.5 >= 3 -> fires at 6, once.
    detector = RunawayDetector(window=4, rise=0.5)
    fired = feed(detector, [2.0] * 4 + [1.5] * 10, [2.0] * 4 + [5.0] * 10)
    assert fired == [6] and detector.fired_step == 6
    assert detector.baseline == (2.0, 2.0)


def test_a_slow_loop_fires_at_the_step_worked_out_by_hand():
    # baseline steps 1-4 at dropped 1; from step 5 dropped = 1 + 0.1 (t - 4) while kept falls. Once the window holds
    # only rising steps (t >= 8) its mean is 1 + 0.1 (t - 5.5), >= 1.5 first at t = 11.
    steps = range(1, 30)
    dropped = [1.0 if t <= 4 else 1 + 0.1 * (t - 4) for t in steps]
    kept = [1.0 - 0.01 * t for t in steps]
    assert feed(RunawayDetector(window=4, rise=0.5), kept, dropped) == [11]
    # a larger rise needs a longer climb: mean >= 2 first at 1 + 0.1 (t - 5.5) >= 2, t = 15.5 -> 16
    assert feed(RunawayDetector(window=4, rise=1.0), kept, dropped) == [16]


def noisy(level, n, spread, seed):
    rng = random.Random(seed)
    return [level * (1 + rng.uniform(-spread, spread)) for _ in range(n)]


@pytest.mark.parametrize("case", ["noisy flat", "both falling", "both rising", "kept rising with dropped"])
def test_healthy_sequences_never_fire(case):
    n = 200
    if case == "noisy flat":  # each step up to 30% off its level; the window mean stays close
        kept, dropped = noisy(1.0, n, 0.3, 0), noisy(2.0, n, 0.3, 1)
    elif case == "both falling":  # healthy training
        kept, dropped = [2.0 * 0.99 ** t for t in range(n)], [3.0 * 0.995 ** t for t in range(n)]
    elif case == "both rising":  # a learning rate too high for the data, selection or not
        kept, dropped = [1.0 * 1.01 ** t for t in range(n)], [2.0 * 1.01 ** t for t in range(n)]
    else:  # dropped triples but kept climbs above its baseline too: not the selection's loop
        kept, dropped = [1.0 + 0.01 * t for t in range(n)], [1.0 + 0.02 * t for t in range(n)]
    assert feed(RunawayDetector(window=8, rise=0.5), kept, dropped) == []


def test_no_verdict_before_the_baseline_is_complete():
    detector = RunawayDetector(window=8, rise=0.5)
    assert feed(detector, [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [1.0, 5, 20, 50, 90, 99, 200]) == []
    assert detector.baseline is None and detector.current is None and not detector.fired


def test_state_round_trip_resumes_to_the_same_decision():
    steps = range(1, 40)
    dropped = [1.0 if t <= 8 else 1 + 0.05 * (t - 8) for t in steps]
    kept = [1.0 - 0.005 * t for t in steps]
    straight = RunawayDetector(window=8, rise=0.5)
    expected = feed(straight, kept, dropped)
    assert len(expected) == 1
    for cut in (3, 8, 12, expected[0], 35):  # inside the baseline, at its end, in the recent window, after firing
        first = RunawayDetector(window=8, rise=0.5)
        fired = feed(first, kept[:cut], dropped[:cut])
        saved = torch.load(_saved(first.state_dict()), weights_only=True)  # as a checkpoint stores it
        resumed = RunawayDetector(window=8, rise=0.5)
        resumed.load_state_dict(saved)
        fired += feed(resumed, kept[cut:], dropped[cut:], first_step=cut + 1)
        assert fired == expected, cut
        assert resumed.state_dict() == straight.state_dict()


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("kwargs,field", [(dict(window=0), "window"), (dict(window=2.5), "window"),
                                          (dict(rise=0.0), "rise"), (dict(rise=float("nan")), "rise")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RunawayDetector.{field}"):
        RunawayDetector(**kwargs)
