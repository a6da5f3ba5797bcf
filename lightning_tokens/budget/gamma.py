"""The Gamma model of the remaining thinking length: encoding, negative log-likelihood, CDF, mode.

A remaining length ``L >= 1`` (thinking tokens left, counting the candidate token; ``L = 1`` for
``</think>``) is modelled on the log scale: ``y = log(L + 1) ~ Gamma(shape alpha, rate lambda)``.
"""

from __future__ import annotations

import torch


def encode_length(length: torch.Tensor) -> torch.Tensor:
    """``y = log(L + 1)``: the scale the Gamma is fitted on."""
    return torch.log1p(length.float())


def decode_length(y: torch.Tensor) -> torch.Tensor:
    """``L = exp(y) - 1``: back from the log scale to tokens."""
    return torch.expm1(y)


def gamma_nll(alpha: torch.Tensor, rate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-log Gamma(y; alpha, rate)`` = ``-[a log l - lgamma(a) + (a - 1) log y - l y]``.

    Args:
        alpha: Shape ``alpha > 0``.
        rate: Rate ``lambda > 0``.
        y: Observations ``y > 0`` (``log(L + 1)``).
    """
    alpha, rate, y = alpha.float(), rate.float(), y.float()
    log_likelihood = alpha * torch.log(rate) - torch.special.gammaln(alpha) + (alpha - 1) * torch.log(y) - rate * y
    return -log_likelihood


def gamma_cdf(alpha: torch.Tensor, rate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``P(Y <= y)`` for ``Y ~ Gamma(alpha, rate)``: the regularised lower incomplete gamma ``P(alpha, rate * y)``."""
    alpha, rate = alpha.float(), rate.float()
    return torch.special.gammainc(alpha, rate * y.float())


def decoded_mode(alpha: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """The most likely remaining length in tokens, ``exp(mode) - 1`` with ``mode = max(alpha - 1, 0) / rate``."""
    return decode_length((alpha.float() - 1).clamp_min(0) / rate.float())
