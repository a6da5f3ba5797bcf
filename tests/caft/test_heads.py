"""MultiTokenHeads: causality, initialisation, saving and loading, argument checks."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.caft import MultiTokenHeads
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.caft.builders import batch, build, trunk_of
from tests.tiny import tiny_config


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Tiny models built from config carry denormal weights; CPU matmuls on them are ~1000x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("model_type,attn,architecture", [
    ("llama", "eager", "layer"), ("llama", "sdpa", "layer"), ("gpt2", "eager", "layer"), ("gpt2", "sdpa", "layer"),
    ("qwen2", "sdpa", "layer"), ("qwen2", "eager", "resblock"),
])
def test_changing_a_later_token_leaves_earlier_head_logits_unchanged(model_type, attn, architecture):
    model, heads = build(model_type, attn, architecture=architecture)
    with torch.no_grad():  # make the heads differ from the last layer, so they are tested on their own
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask, _ = batch()
    changed = ids.clone()
    changed[:, 9] = 4
    before = heads(model, trunk_of(model, ids, mask)[0], mask)
    after = heads(model, trunk_of(model, changed, mask)[0], mask)
    early = mask.bool().clone()
    early[:, 9:] = False
    for a, b in zip(before, after):
        torch.testing.assert_close(a[early], b[early], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_resblock_starts_as_identity_and_layer_heads_copy_the_last_layer():
    model, heads = build("llama", architecture="resblock", num_heads=2)
    assert all(torch.count_nonzero(b.linear.weight) == 0 for b in heads.blocks)
    model, heads = build("llama")
    last = model.model.layers[-1]
    for block in heads.blocks:
        for (name, a), (_, b) in zip(block.named_parameters(), last.named_parameters()):
            assert torch.equal(a, b), name
            assert a.data_ptr() != b.data_ptr()


def test_save_and_load_round_trip_and_mismatches(tmp_path):
    model, heads = build("llama", num_heads=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    heads.save(tmp_path / "heads")
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["heads.safetensors", "heads_config.json"]
    loaded = MultiTokenHeads.load(tmp_path / "heads", model)
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    wider, _ = load_causal_lm(ModelSpec(config=tiny_config("llama", intermediate_size=96)))
    with pytest.raises(ValueError, match=r"mlp.*shape"):
        MultiTokenHeads.load(tmp_path / "heads", wider)
    gpt2, _ = load_causal_lm(ModelSpec(config=tiny_config("gpt2")))
    with pytest.raises(ValueError, match="missing keys"):
        MultiTokenHeads.load(tmp_path / "heads", gpt2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultiTokenHeads.load(tmp_path / "nowhere", model)


def test_bad_arguments_name_the_field():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("llama")))
    with pytest.raises(ValueError, match="num_heads"):
        MultiTokenHeads(model, num_heads=0)
    with pytest.raises(ValueError, match="architecture"):
        MultiTokenHeads(model, architecture="mlp")
