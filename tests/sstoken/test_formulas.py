"""ssToken formulas (sstoken/formulas.py): top-k with ties and empty rows, per-sample min-max, Spearman rank."""

from __future__ import annotations

import torch

from lightning_tokens.sstoken.formulas import keep_count, minmax_per_sample, rank_correlation, select_top


def test_select_top_breaks_ties_by_position_and_handles_empty_rows():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5])
    response = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 1], [0] * 5]).bool()
    keep = select_top(scores, response, 0.6)
    assert keep.tolist() == [[True, True, True, False, False], [False] * 4 + [True], [False] * 5]
    assert keep_count(0.7, 10) == 7 and keep_count(0.6, 1) == 1 and keep_count(1.0, 0) == 0


def test_minmax_is_finite_for_constant_single_and_empty_rows():
    values = torch.tensor([[2.0, 2.0, 2.0], [5.0, 0.0, 0.0], [1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    response = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]]).bool()
    out = minmax_per_sample(values, response)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2], torch.tensor([0.0, 1.0, 0.5]), atol=1e-6, rtol=0)
    assert out[0].abs().max() < 1e-6 and out[1, 0] == 0 and out[3].abs().max() == 0


def test_rank_correlation_matches_naive_spearman():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    response = torch.ones(3, 9, dtype=torch.bool)
    response[1, 5:] = False
    expected = []
    for row in range(3):
        idx = response[row].nonzero().flatten()
        ra = a[row, idx].argsort().argsort().float()
        rb = b[row, idx].argsort().argsort().float()
        expected.append(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    torch.testing.assert_close(rank_correlation(a, b, response), torch.stack(expected).mean())
    assert torch.isnan(rank_correlation(a, b, torch.zeros_like(response)))
