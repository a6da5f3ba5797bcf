"""Runaway selection: the self-reinforcing loop of REL-ranked token selection, detected while training.

After the warm-up, ranking by ``REL = L_his - L_cur`` keeps the tokens the current model has moved furthest on
since the history model, which is what it learns fastest (injected filler, as a class, is learnt at once). The
tokens it is getting worse at get negative REL, are dropped, and nothing pulls them back: the dropped tokens' loss
rises while the kept tokens' loss keeps falling, and ``val/loss`` rises with it (the ssToken evidence runs at lr
1e-3 kept 77% of the noise against a 60% budget and collapsed, and ended worse than full SFT on clean data too;
see experiments/README.md).

:class:`RunawayDetector` watches that signature on one figure per optimizer step, the mean current loss of the
kept and of the dropped response tokens. Its baseline is the mean of the first ``window`` steps it sees (the
first steps after the warm-up); it fires, once, at the first step where over the last ``window`` steps

- the dropped tokens' mean loss is at least ``(1 + rise)`` times its baseline, and
- the kept tokens' mean loss is at most its baseline (still falling, or flat).

Healthy training lowers both; a learning rate too high for the data raises both; neither fires. A mean over
``window`` steps keeps one noisy step from firing it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from lightning_tokens.checks import check_numbers

# Defaults of ``TokenSelection(runaway_window=..., runaway_rise=...)``, set from the measurement runs.
RUNAWAY_WINDOW = 8
RUNAWAY_RISE = 0.5


class RunawaySelection(RuntimeError):
    """Raised by ``TokenSelection(on_runaway="raise")`` when its :class:`RunawayDetector` fires."""


class RunawayDetector:
    """Fires once when the dropped tokens' loss rises well above its early level while the kept tokens' keeps falling.

    Feed it one :meth:`update` per optimizer step with REL in use (after the warm-up); see the module docstring
    for the rule.

    Args:
        window: Steps in the baseline and in the recent window it is compared with. Default ``8``.
        rise: How far above its baseline the dropped tokens' mean loss must be, as a fraction of it. Default
            ``0.5`` (1.5 times the baseline).

    Attributes:
        baseline: ``(kept, dropped)`` mean losses of the first ``window`` steps, ``None`` until there are as many.
        fired_step: The step it fired at, ``None`` until it fires.
    """

    def __init__(self, window: int = RUNAWAY_WINDOW, rise: float = RUNAWAY_RISE) -> None:
        check_numbers("RunawayDetector", window=(window, "an integer >= 1"), rise=(rise, "> 0"))
        self.window, self.rise = window, float(rise)
        self.first: list[tuple[float, float]] = []  # the steps the baseline is made of, until it is complete
        self.baseline: Optional[tuple[float, float]] = None
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        self.fired_step: Optional[int] = None

    @property
    def fired(self) -> bool:
        """Whether it has fired."""
        return self.fired_step is not None

    @property
    def current(self) -> Optional[tuple[float, float]]:
        """``(kept, dropped)`` mean losses of the last ``window`` steps, ``None`` until there are as many."""
        if len(self.recent) < self.window:
            return None
        return _mean(self.recent)

    def update(self, step: int, kept: float, dropped: float) -> bool:
        """Record one optimizer step's mean kept and dropped loss; ``True`` when it fires at this step.

        Args:
            step: The optimizer step, reported as the step it fired at.
            kept: Mean current loss of the kept response tokens over the step.
            dropped: Mean current loss of the dropped response tokens over the step.
        """
        if self.fired:
            return False
        self.recent.append((kept, dropped))
        if self.baseline is None:
            self.first.append((kept, dropped))
            if len(self.first) == self.window:
                self.baseline, self.first = _mean(self.first), []
            return False
        (base_kept, base_dropped), (now_kept, now_dropped) = self.baseline, self.current
        if now_dropped >= (1 + self.rise) * base_dropped and now_kept <= base_kept:
            self.fired_step = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"first": list(self.first), "baseline": self.baseline, "recent": list(self.recent),
                "fired_step": self.fired_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first = [tuple(pair) for pair in state["first"]]
        self.baseline = tuple(state["baseline"]) if state["baseline"] is not None else None
        self.recent = deque((tuple(pair) for pair in state["recent"]), maxlen=self.window)
        self.fired_step = state["fired_step"]


def runaway_message(detector: RunawayDetector, negative_rel: Optional[float]) -> str:
    """What :class:`TokenSelection` says when ``detector`` has fired: the step, the figures and what to do."""
    (base_kept, base_dropped), (now_kept, now_dropped) = detector.baseline, detector.current
    negative = f"; {negative_rel:.0%} of the response tokens have negative REL" if negative_rel is not None else ""
    return (f"Runaway selection at step {detector.fired_step}: over the last {detector.window} steps the dropped "
            f"tokens' loss is {now_dropped:.4f} against {base_dropped:.4f} after the warm-up, while the kept tokens' "
            f"is {now_kept:.4f} against {base_kept:.4f}{negative}. Ranking by REL keeps what the model learns "
            "fastest and drops for good the tokens it gets worse at. Lower the learning rate, or use "
            "mode='rho1' with a reference model fine-tuned on clean data, or mode='attention'; see "
            "'When token selection hurts' in docs/methods/sstoken.md.")


def _mean(pairs) -> tuple[float, float]:
    pairs = list(pairs)
    return sum(k for k, _ in pairs) / len(pairs), sum(d for _, d in pairs) / len(pairs)
