"""The ssToken formulas on per-token tensors, free of any model: normalise, mix, select, correlate.

All tensors are ``(B, N)`` over prediction positions (``N = T - 1``, position ``t`` predicts token ``t + 1``)
with a boolean ``response`` mask marking the target (response) tokens of each sample.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Added to the min-max range, as in the paper, so a sample whose REL is constant maps to 0, not NaN.
MINMAX_EPS = 1e-8


def keep_count(ratio: float, n_response: int) -> int:
    """Tokens kept in a sample with ``n_response`` response tokens: ``ceil(ratio * n_response)``.

    The product is rounded to 6 decimals first, so ``0.7 * 10`` keeps 7 tokens, not 8.
    """
    return math.ceil(round(ratio * n_response, 6))


def minmax_per_sample(values: Tensor, response: Tensor) -> Tensor:
    """``(v - min) / (max - min + 1e-8)`` with min and max over each sample's response tokens; 0 elsewhere."""
    values = values.float()
    low = values.masked_fill(~response, math.inf).amin(dim=1, keepdim=True)
    high = values.masked_fill(~response, -math.inf).amax(dim=1, keepdim=True)
    # Rows without response tokens have low=inf, high=-inf: make them finite before dividing.
    empty = ~response.any(dim=1, keepdim=True)
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    normalised = (values - low) / (high - low + MINMAX_EPS)
    return normalised.masked_fill(~response, 0.0)


def mix_scores(rel_norm: Tensor, attention: Tensor, gamma: float) -> Tensor:
    """The ssToken score ``gamma * REL_norm + (1 - gamma) * AttnScore``."""
    return gamma * rel_norm + (1.0 - gamma) * attention


def select_top(scores: Tensor, response: Tensor, ratio: float) -> Tensor:
    """Per sample, the ``ceil(ratio * n_response)`` response tokens with the highest score.

    Ties are broken by position: the earlier token wins. Returns a ``(B, N)`` boolean mask.
    """
    # keep_count on the device (no host sync): ceil of ratio * n rounded to 6 decimals
    k = torch.ceil(torch.round(ratio * response.sum(dim=1).double() * 1e6) / 1e6)
    masked = scores.float().masked_fill(~response, -math.inf)
    order = masked.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return (ranks < k[:, None]) & response


def rank_correlation(a: Tensor, b: Tensor, response: Tensor) -> Tensor:
    """Mean over samples of Spearman's rank correlation of ``a`` and ``b`` over each sample's response tokens.

    Samples with fewer than 2 response tokens or a constant signal are skipped; NaN when none is left.
    Ties get ordinal ranks (by position).
    """

    def ranks(values: Tensor) -> Tensor:
        # Non-response positions sort last, so response tokens get ranks 0..n-1.
        order = values.float().masked_fill(~response, math.inf).argsort(dim=1, stable=True)
        return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order)).float()

    n = response.sum(dim=1, keepdim=True).float()
    ra, rb = ranks(a), ranks(b)
    ra = (ra - (ra * response).sum(1, keepdim=True) / n.clamp_min(1)) * response
    rb = (rb - (rb * response).sum(1, keepdim=True) / n.clamp_min(1)) * response
    cov = (ra * rb).sum(1)
    scale = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    valid = (n.squeeze(1) >= 2) & (scale > 0)
    # Constant signals give identical ordinal ranks to a non-constant one; drop them explicitly.
    for values in (a, b):
        v = values.float()
        spread = v.masked_fill(~response, -math.inf).amax(1) - v.masked_fill(~response, math.inf).amin(1)
        valid &= spread > 0
    if not valid.any():
        return torch.tensor(float("nan"), device=a.device)
    return (cov[valid] / scale[valid]).mean()
