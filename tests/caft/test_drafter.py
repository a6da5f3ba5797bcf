"""HeadDrafter: drafts of layer and resblock heads, run incrementally over new slots, equal the argmax of the heads'
logits from one full forward over the whole sequence."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lightning_tokens.caft import MultiTokenHeads, capture_trunk
from lightning_tokens.caft.drafter import HeadDrafter
from lightning_tokens.modeling import ModelSpec, cache_keyword, load_causal_lm
from tests.tiny import padded_rows, tiny_config


@pytest.mark.parametrize("architecture", ["layer", "resblock"])
def test_incremental_drafts_equal_the_argmax_of_full_head_logits(architecture):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("llama", initializer_range=0.2)))
    model.eval()
    heads = MultiTokenHeads(model, num_heads=3, architecture=architecture).eval()
    with torch.no_grad():  # heads that differ from the last layer and from the identity
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask = padded_rows([[1, 7, 9, 11, 13], [1, 30, 2]], 5, "left")
    extra = torch.tensor([[21, 22], [23, 24]])  # two later rounds of one token each
    drafter = HeadDrafter(heads, model, num_draft=2)
    cache = DynamicCache()
    rows = torch.arange(2)
    with torch.no_grad():
        steps = [ids, extra[:, :1], extra[:, 1:]]
        for step, new in enumerate(steps):
            seen = torch.cat([ids, extra[:, :step]], 1)
            slot_mask = torch.cat([mask, torch.ones_like(extra[:, :step])], 1)
            with capture_trunk(model) as holder:
                model(input_ids=new, attention_mask=slot_mask, use_cache=True, **{cache_keyword(model): cache})
            drafts = drafter.advance(holder["trunk"], slot_mask, torch.full((2,), new.shape[1] - 1))
            with capture_trunk(model) as full:
                model(input_ids=seen, attention_mask=slot_mask)
            logits = heads(model, full["trunk"], slot_mask)
            want = torch.stack([logits[k][rows, -1].argmax(-1) for k in range(2)], 1)  # the third head never runs
            assert torch.equal(drafts, want), step
    assert drafter.length == ids.shape[1] + 2
    assert all((cache is None) == (architecture == "resblock") for cache in drafter.caches)
