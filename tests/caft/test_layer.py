"""Layer heads: a fresh head, a copy of the last decoder layer, reproduces the model's own logits."""

from __future__ import annotations

import pytest
import torch

from tests.caft.builders import batch, build, trunk_of


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Tiny models built from config carry denormal weights; CPU matmuls on them are ~1000x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fresh_layer_heads_reproduce_the_main_head(model_type, attn):
    # A head initialised as a copy of the last layer, fed that layer's input, then the final norm and lm_head,
    # must give the model's own logits: checks the trunk, the mask and the rotary embeddings together.
    model, heads = build(model_type, attn)
    ids, mask, _ = batch()
    trunk, logits = trunk_of(model, ids, mask)
    real = mask.bool()
    real[2] = False  # left-padded rows: the model's own mask gives padded queries garbage; compare the others
    real[2, 3:] = True
    for head_logits in heads(model, trunk, mask):
        torch.testing.assert_close(head_logits[real], logits[real], rtol=1e-4, atol=1e-4)
