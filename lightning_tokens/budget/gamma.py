"""The Gamma model of the remaining thinking length: encoding, negative log-likelihood, CDF, mode.

A remaining length ``L >= 1`` (thinking tokens left, counting the candidate token; ``L = 1`` for
``</think>``) is modelled on the log scale: ``y = log(L + 1) ~ Gamma(shape alpha, rate lambda)``.

Every function computes in float64 when any input is float64, else in float32 (half-precision inputs are
upcast: the log-likelihood's terms cancel, and at large shapes they are far larger than the result).
"""

from __future__ import annotations

import functools

import torch


def _math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.float64 if dtype == torch.float64 else torch.float32


def encode_length(length: torch.Tensor) -> torch.Tensor:
    """``y = log(L + 1)``: the scale the Gamma is fitted on."""
    return torch.log1p(length.to(_math_dtype(length)))


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
    dtype = _math_dtype(alpha, rate, y)
    alpha, rate, y = alpha.to(dtype), rate.to(dtype), y.to(dtype)
    log_likelihood = alpha * torch.log(rate) - torch.special.gammaln(alpha) + (alpha - 1) * torch.log(y) - rate * y
    return -log_likelihood


def gamma_cdf(alpha: torch.Tensor, rate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``P(Y <= y)`` for ``Y ~ Gamma(alpha, rate)``: the regularised lower incomplete gamma ``P(alpha, rate * y)``."""
    dtype = _math_dtype(alpha, rate, y)
    return torch.special.gammainc(alpha.to(dtype), rate.to(dtype) * y.to(dtype))


def decoded_mode(alpha: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """The most likely remaining length in tokens, ``exp(mode) - 1`` with ``mode = max(alpha - 1, 0) / rate``."""
    dtype = _math_dtype(alpha, rate)
    return decode_length((alpha.to(dtype) - 1).clamp_min(0) / rate.to(dtype))
