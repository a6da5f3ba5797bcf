"""The CAFT auxiliary-loss schedules s(p) over training progress p = step / total_steps in [0, 1]."""

from __future__ import annotations

import math

SCHEDULES = ("rsine", "sine", "linear", "constant", "sine_r")


def parse_schedule(name: str, sine_ratio: float) -> tuple[str, float]:
    """Normalise a schedule name; ``"sine_0.3"`` (the reference code's spelling) means ``sine_r`` with r = 0.3."""
    if name.startswith("sine_") and name != "sine_r":
        try:
            sine_ratio = float(name.split("_", 1)[1])
        except ValueError:
            raise ValueError(f"schedule: {name!r} is not 'sine_<ratio>' (e.g. 'sine_0.3')") from None
        name = "sine_r"
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (or 'sine_<ratio>'), got {name!r}")
    if name == "sine_r" and not 0 < sine_ratio <= 1:
        raise ValueError(f"sine_ratio must be in (0, 1], got {sine_ratio}")
    return name, sine_ratio


def schedule_value(name: str, progress: float, sine_ratio: float = 0.2) -> float:
    """s(p) of schedule ``name`` at progress ``p`` (clamped to [0, 1]).

    * ``rsine``: ``sin(pi/2 * (1 - p))``, from 1 down to 0 (the paper's default);
    * ``sine``: ``sin(pi/2 * p)``, from 0 up to 1;
    * ``linear``: ``p``;
    * ``constant``: ``1``;
    * ``sine_r``: ``sin(pi/2 * p / r)`` while ``p < r``, then 1.

    Args:
        name: Schedule name (see above, or ``"sine_<r>"``).
        progress: Training progress ``step / total_steps``.
        sine_ratio: ``r`` of ``sine_r``. Default ``0.2``.
    """
    name, sine_ratio = parse_schedule(name, sine_ratio)
    p = min(1.0, max(0.0, float(progress)))
    if name == "rsine":
        return math.sin(math.pi / 2 * (1 - p))
    if name == "sine":
        return math.sin(math.pi / 2 * p)
    if name == "linear":
        return p
    if name == "constant":
        return 1.0
    return math.sin(math.pi / 2 * p / sine_ratio) if p < sine_ratio else 1.0
