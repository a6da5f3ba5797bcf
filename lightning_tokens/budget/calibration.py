"""Thresholds of budget guidance's trained-row check, calibrated on the predictor's own held-out predictions.

:func:`~lightning_tokens.budget.guidance.guidance_weights` keeps a candidate's weight only when its head row
looks trained: ``rate >= min_rate``, ``alpha > min_shape`` and decoded mode ``>= min_mode``. The reference's
values (10, 1, 0.9) suit its predictor and its long traces; a predictor fitted to shorter thinking
(``y = log(L + 1)`` small) gives trained rows lower rates, and those thresholds then mask them too.
:func:`calibrate_thresholds` reads the thresholds off predictions for rows that are trained by construction.
"""

from __future__ import annotations

from typing import Optional

import torch

from lightning_tokens.budget.gamma import decoded_mode

#: The reference's thresholds (the defaults of :class:`BudgetGuidanceLogitsProcessor`).
REFERENCE_THRESHOLDS = {"min_rate": 10.0, "min_shape": 1.0, "min_mode": 0.9}


def calibrate_thresholds(alpha: torch.Tensor, rate: torch.Tensor, length: torch.Tensor, quantile: float = 0.05,
                         window: float = 10.0, ceiling: Optional[dict[str, float]] = None) -> dict[str, float]:
    """``min_rate``, ``min_shape`` and ``min_mode`` for :class:`BudgetGuidanceLogitsProcessor` from held-out traces.

    Rule: take the predictor's outputs at the realised next tokens of held-out traces (rows that training
    reached), keep the positions whose decoded length ``exp(mode) - 1`` is within ``window`` tokens of the
    true remaining length ``L`` (the predictor is right there, so the row is a trained one), and take the
    ``quantile`` of each statistic over them: about that share of such positions fails each check. Each
    threshold is then capped at ``ceiling`` (the reference's values by default), so calibration only loosens
    a check that masks trained rows and never masks more than the reference. The cap matters for the shape
    and mode checks: ``alpha > 1`` (a Gamma with a mode) and a decoded mode of at least ~1 token (``L >= 1``)
    hold for any trained row whatever the length scale, while a low quantile taken over positions would
    exceed what the rare short-remaining rows (``</think>`` itself, ``L = 1``) predict and mask them. The
    rate scales with the length scale and the predictor's confidence, and is the check calibration moves.
    When no position is within the window, every position is used.

    Args:
        alpha: ``(P,)`` predicted shapes at the realised next tokens.
        rate: ``(P,)`` predicted rates there.
        length: ``(P,)`` true remaining lengths ``L`` (tokens, ``>= 1``).
        quantile: Share of accurate positions allowed to fail each check, in ``[0, 1)``. Default ``0.05``.
        window: Tokens of error that count as accurate. Default ``10.0`` (the module's ``val/within_window``).
        ceiling: Upper bounds of ``min_rate``, ``min_shape``, ``min_mode``. Default ``None``: the reference's
            ``10``, ``1`` and ``0.9`` (the processor's defaults); pass ``{}`` for the bare quantiles.

    Returns:
        ``{"min_rate", "min_shape", "min_mode"}``: pass as ``BudgetGuidanceLogitsProcessor(..., **thresholds)``.
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"calibrate_thresholds: quantile must be in [0, 1), got {quantile}")
    if window < 0:
        raise ValueError(f"calibrate_thresholds: window must be >= 0, got {window}")
    alpha, rate, length = (t.detach().flatten().double().cpu() for t in (alpha, rate, length))
    if not (alpha.numel() == rate.numel() == length.numel()) or alpha.numel() == 0:
        raise ValueError("calibrate_thresholds: alpha, rate and length must be non-empty and of equal size")
    ceiling = REFERENCE_THRESHOLDS if ceiling is None else ceiling
    mode = decoded_mode(alpha, rate)
    accurate = (mode - length).abs() <= window
    if not accurate.any():
        accurate = torch.ones_like(accurate)
    # Lower interpolation: each quantile is one of the observed values, so the rate and mode checks (>=) keep
    # at least 1 - q of the accurate positions; the shape check is strict (>), so the positions at the
    # quantile itself fail it too.
    thresholds = {}
    for name, values in (("min_rate", rate), ("min_shape", alpha), ("min_mode", mode)):
        value = float(torch.quantile(values[accurate], quantile, interpolation="lower"))
        thresholds[name] = min(value, ceiling[name]) if name in ceiling else value
    return thresholds
