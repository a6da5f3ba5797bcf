"""The Gamma formulas of budget guidance (budget/gamma.py) against scipy, in float32 and float64."""

from __future__ import annotations

import torch
from scipy import stats

from lightning_tokens.budget import decoded_mode, gamma_cdf, gamma_nll


def test_gamma_nll_and_cdf_match_scipy():
    g = torch.Generator().manual_seed(0)
    alpha = 0.2 + 30 * torch.rand(200, generator=g, dtype=torch.float64)
    rate = 0.2 + 40 * torch.rand(200, generator=g, dtype=torch.float64)
    y = torch.log1p(1 + 5000 * torch.rand(200, generator=g, dtype=torch.float64))
    ref_nll = -stats.gamma.logpdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    ref_cdf = stats.gamma.cdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    torch.testing.assert_close(gamma_nll(alpha, rate, y).double(), torch.from_numpy(ref_nll), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gamma_cdf(alpha, rate, y).double(), torch.from_numpy(ref_cdf), rtol=1e-4, atol=1e-5)
    mode = decoded_mode(alpha, rate).double()
    torch.testing.assert_close(mode, torch.exp((alpha - 1).clamp_min(0) / rate) - 1, rtol=1e-5, atol=1e-5)


def test_gamma_nll_and_cdf_keep_float64_and_match_scipy_to_1e9_from_1e4_to_1e5():
    # shapes and rates log-uniform over 1e-4 .. 1e5; y near the mean, and spread around it
    g = torch.Generator().manual_seed(1)
    alpha = 10 ** (-4 + 9 * torch.rand(400, generator=g, dtype=torch.float64))
    rate = 10 ** (-4 + 9 * torch.rand(400, generator=g, dtype=torch.float64))
    y = (alpha / rate) * torch.exp(torch.randn(400, generator=g, dtype=torch.float64) * 0.5)
    y = torch.cat([y, torch.tensor([1.0], dtype=torch.float64)])
    alpha = torch.cat([alpha, torch.tensor([1e5], dtype=torch.float64)])
    rate = torch.cat([rate, torch.tensor([1e5], dtype=torch.float64)])  # shape = rate = 1e5, the case
    nll, cdf = gamma_nll(alpha, rate, y), gamma_cdf(alpha, rate, y)
    assert nll.dtype == cdf.dtype == torch.float64
    ref_nll = -stats.gamma.logpdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    ref_cdf = stats.gamma.cdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    torch.testing.assert_close(nll, torch.from_numpy(ref_nll), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cdf, torch.from_numpy(ref_cdf), rtol=1e-9, atol=1e-9)
    assert decoded_mode(alpha, rate).dtype == torch.float64
    assert gamma_nll(alpha.float(), rate.float(), y.float()).dtype == torch.float32
    assert gamma_nll(alpha.bfloat16(), rate.bfloat16(), y.bfloat16()).dtype == torch.float32  # upcast, not kept
