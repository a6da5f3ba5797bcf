"""Resblock heads: a heads folder in the documented format, written without the package, loads and predicts as
Medusa's ``x + SiLU(W x + b)``."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lightning_tokens.caft import MultiTokenHeads, capture_trunk
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config


def tiny(model_type: str):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type)))
    return model.eval()


def test_a_resblock_heads_folder_written_by_hand_loads_and_predicts_as_medusa(tmp_path):
    # The documented format (heads.safetensors with blocks.{i}.linear.*, heads_config.json), written without the
    # package, must load; each head's logits are lm_head(norm(x + SiLU(W x + b))) on the last layer's input x.
    model = tiny("llama")
    size, vocab = model.config.hidden_size, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    weights = {f"blocks.{i}.linear.{leaf}": 0.1 * torch.randn(*shape, generator=g)
               for i in range(2) for leaf, shape in (("weight", (size, size)), ("bias", (size,)))}
    save_file(weights, str(tmp_path / "heads.safetensors"))
    (tmp_path / "heads_config.json").write_text(json.dumps(dict(
        num_heads=2, architecture="resblock", separate_unembedding=False, hidden_size=size, vocab_size=vocab)))
    heads = MultiTokenHeads.load(tmp_path, model).eval()
    ids = torch.randint(5, vocab, (2, 9), generator=g)
    with torch.no_grad(), capture_trunk(model) as holder:
        x = model(ids, output_hidden_states=True).hidden_states[-2]
        logits = heads(model, holder["trunk"])
    for i, got in enumerate(logits):
        states = x + F.silu(x @ weights[f"blocks.{i}.linear.weight"].T + weights[f"blocks.{i}.linear.bias"])
        expected = model.lm_head(model.model.norm(states))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
