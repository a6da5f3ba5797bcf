"""generate_with_heads on one row: the same tokens as greedy generate, fewer drafts, stopping at EOS."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.caft import generate_with_heads
from tests.caft.builders import build


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Tiny models built from config carry denormal weights; CPU matmuls on them are ~1000x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("model_type,architecture", [("llama", "layer"), ("gpt2", "layer"), ("qwen2", "resblock")])
def test_speculative_decoding_equals_greedy_generate(model_type, architecture):
    model, heads = build(model_type, architecture=architecture)
    with torch.no_grad():  # imperfect drafts, so that both acceptance and rejection happen
        for p in heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for prompt in ([1, 7, 9, 11], [1, 30, 2, 2, 40, 41]):
        ids = torch.tensor([prompt])
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        got, stats = generate_with_heads(model, heads, ids, max_new_tokens=16, eos_token_id=[])
        assert torch.equal(got, reference)
        assert stats.new_tokens == 16 and 0 <= stats.acceptance_rate <= 1
        # each forward adds its accepted drafts + 1 (the last one may overshoot the budget by one)
        assert stats.accepted + stats.forwards - 1 <= stats.new_tokens <= stats.accepted + stats.forwards


def test_speculative_decoding_with_fewer_drafts_is_still_exact():
    model, heads = build("llama", num_heads=3)
    ids = torch.tensor([[1, 7, 9, 11]])
    reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    got, stats = generate_with_heads(model, heads, ids, max_new_tokens=12, eos_token_id=[], num_draft=1)
    assert torch.equal(got, reference) and stats.drafted <= stats.forwards
    with pytest.raises(ValueError, match="num_draft"):
        generate_with_heads(model, heads, ids, num_draft=4)


def test_speculative_decoding_stops_at_eos_like_generate():
    model, heads = build("llama")
    ids = torch.tensor([[0, 0, 1, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    reference = model.generate(input_ids=ids[:, 2:], max_new_tokens=30, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    eos = int(reference[0, 3 + 5])  # a token the model emits: it must stop right after its first occurrence
    first = (reference[0, 3:] == eos).nonzero()[0, 0].item()
    got, stats = generate_with_heads(model, heads, ids, mask, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(got, reference[:, : 3 + first + 1])
    with pytest.raises(ValueError, match="shape"):
        generate_with_heads(model, heads, torch.ones(3, dtype=torch.long))
