"""The thought-delimiter embeddings (trained at the scaled rate) and the mixing head (the mix it computes)."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import MixingHead, QuietSTaRModule, ThoughtEmbeddings
from tests.tiny import tiny_config


def test_thought_embeddings_train_at_the_scaled_rate():
    """One Adam step moves each embedding entry by lr * scale (Adam's first step is lr * sign(grad))."""
    module = QuietSTaRModule(ModelSpec(config=tiny_config("llama")), thought_length=2, n_ahead_talk=2)
    with torch.no_grad():  # with the initial zero mixing head nothing depends on the thought yet
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    optimizer = torch.optim.Adam(module.thought_embeddings.parameters(), lr=1e-4)
    before = module.thought_embeddings().detach().clone()
    ids = torch.randint(3, 300, (2, 7))
    module.quiet_star(ids, torch.ones_like(ids)).loss.backward()
    grad = module.thought_embeddings.scaled.grad
    optimizer.step()
    change = (module.thought_embeddings().detach() - before).abs()
    moved = grad.abs() > 1e-6
    assert moved.any()
    torch.testing.assert_close(change[moved], torch.full_like(change[moved], 1e-4 * 100), rtol=1e-3, atol=1e-6)


def test_mixing_head_mixes_by_the_weight_of_its_mlp():
    """Zero at first (the base state itself), then ``(1 - w) * base + w * thought`` with ``w`` the MLP written out."""
    torch.manual_seed(0)
    head = MixingHead(8).double()
    base, thought = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    mixed, weight = head(base, thought)
    assert torch.equal(mixed, base) and torch.count_nonzero(weight) == 0
    torch.nn.init.normal_(head.net[-1].weight)
    first, second, last = head.net[0], head.net[2], head.net[4]
    x = torch.cat([base, thought], -1)
    hidden = torch.relu(torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias)
    expected_weight = hidden @ last.weight.T
    mixed, weight = head(base, thought)
    assert weight.shape == (3, 5, 1) and expected_weight.abs().max() > 0
    torch.testing.assert_close(weight, expected_weight)
    torch.testing.assert_close(mixed, (1 - expected_weight) * base + expected_weight * thought)


def test_thought_embeddings_start_from_the_initial_embedding_and_refuse_a_bad_scale():
    initial = torch.randn(6)
    embeddings = ThoughtEmbeddings(initial, scale=10.0)
    torch.testing.assert_close(embeddings.start, initial)
    torch.testing.assert_close(embeddings.end, initial)
    torch.testing.assert_close(embeddings(), torch.stack([initial, initial]))
    torch.testing.assert_close(embeddings.scaled.detach(), torch.stack([initial, initial]) / 10)
    for scale in (0.0, -1.0):
        with pytest.raises(ValueError, match="scale"):
            ThoughtEmbeddings(initial, scale=scale)
