"""The parallel thought passes against naive sequential generation and against the growing-cache implementation
they replaced (loss and gradients), and the exactness of the thought sampling."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule
from lightning_tokens.quiet_star.parallel import sample_tokens
from tests.quiet_star.naive import (
    N_THOUGHTS,
    TALK,
    TOL,
    assert_equal_to_the_growing_cache,
    batch,
    make_module,
    naive_branch,
    run_passes,
)
from tests.tiny import padded_rows, tiny_config


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
@torch.no_grad()
def test_parallel_thoughts_equal_naive_sequential_generation(model_type, attn):
    module = make_module(model_type, attn).eval()
    ids, mask = batch()
    passes = run_passes(module, ids, mask)
    head = module.lm.get_output_embeddings()
    compared = 0
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            future = ids[b, i + 1: min(length, i + TALK)]  # the true tokens the talk steps read
            thought, (base_logits, base_hidden), talk = naive_branch(module, ids[b, : i + 1],
                                                                     ids[b, i + 1: min(length, i + TALK + 1)])
            torch.testing.assert_close(head(passes.base_hidden[b, i]), base_logits, **TOL)
            for k in range(N_THOUGHTS):
                row = b * N_THOUGHTS + k
                assert passes.thought_tokens[row, i].tolist() == thought, (b, i, k)
                for s, (logits, hidden) in enumerate(talk):
                    torch.testing.assert_close(head(passes.talk_hidden[s][row, i]), logits, **TOL)
                    torch.testing.assert_close(passes.talk_hidden[s][row, i], hidden, **TOL)
            compared += 1 + len(future)
    assert compared > 20


def test_thought_sampling_is_an_exact_sample_of_the_softmax():
    """Gumbel-max sampling at temperature t matches softmax(logits / t); temperature 0 is the argmax."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1.0, 2.0):
        draws = sample_tokens(logits.expand(40000, -1), temperature, generator)
        frequencies = torch.bincount(draws, minlength=5).double() / draws.numel()
        probs = (logits / temperature).softmax(-1).double()
        assert frequencies[4] == 0
        assert torch.all((frequencies - probs).abs() <= 5 * (probs * (1 - probs) / draws.numel()).sqrt() + 1e-9)
    assert sample_tokens(logits.expand(3, -1), 0.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("n_thoughts", [1, 2])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
def test_passes_give_the_loss_and_gradients_of_the_growing_cache(monkeypatch, model_type, side, n_thoughts):
    no_dropout = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0) if model_type == "gpt2" else {}
    spec = ModelSpec(config=tiny_config(model_type, **no_dropout), dtype="float64")  # comparable in training mode
    module = QuietSTaRModule(spec, thought_length=3, n_ahead_talk=3, n_thoughts=n_thoughts, policy_weight=1.0)
    torch.manual_seed(1)
    with torch.no_grad():  # a mixing head that mixes, so every part of the loss has a gradient
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    module = module.double()
    g = torch.Generator().manual_seed(5)
    batch = padded_rows([torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 4, 7)], 10, side)
    assert_equal_to_the_growing_cache(monkeypatch, module, batch)
