"""CAFT head variants: one class per architecture, chosen once, and the saved-heads format they all keep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import tiny_config
from lightning_tokens.caft import MultiTokenHeads, capture_trunk
from lightning_tokens.caft.heads import head_variant
from lightning_tokens.caft.layer import LayerVariant
from lightning_tokens.caft.mtp import MtpVariant, export_mtp
from lightning_tokens.caft.resblock import ResBlockVariant
from lightning_tokens.modeling import ModelSpec, load_causal_lm

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_tokens"


def tiny(model_type: str):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type)))
    return model.eval()


@pytest.mark.parametrize("architecture,variant,model_type", [
    ("layer", LayerVariant, "llama"), ("resblock", ResBlockVariant, "llama"), ("mtp", MtpVariant, "glm4_moe")])
def test_each_architecture_is_its_own_variant_class(architecture, variant, model_type):
    model = tiny(model_type)
    first, second = (MultiTokenHeads(model, num_heads=2, architecture=architecture) for _ in range(2))
    assert type(first.variant) is variant and first.architecture == architecture
    assert first.variant is not second.variant  # per-heads state (unused_arguments) is never shared
    assert json.loads(json.dumps(first.config))["architecture"] == architecture


def test_an_unknown_architecture_is_one_error_naming_the_field():
    with pytest.raises(ValueError, match=r"architecture must be 'layer', 'resblock' or 'mtp', got 'medusa'"):
        head_variant("medusa")
    with pytest.raises(ValueError, match="architecture"):
        head_variant(["layer"])


def test_only_the_factory_compares_the_architecture_string():
    pattern = re.compile(r"architecture\s*(==|!=|\bin\b|\bnot in\b)")
    hits = [f"{path.relative_to(PACKAGE)}:{number}" for path in sorted(PACKAGE.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), start=1) if pattern.search(line)]
    factory = (PACKAGE / "caft" / "heads.py").read_text().splitlines()
    start = next(i for i, line in enumerate(factory, start=1) if line.startswith("def head_variant("))
    assert all(hit.startswith("caft/heads.py:") and start < int(hit.split(":")[1]) < start + 12 for hit in hits), hits


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


def test_export_refuses_heads_other_than_mtp(tmp_path):
    model = tiny("glm4_moe")
    with pytest.raises(ValueError, match="the heads are 'resblock' heads"):
        export_mtp(model, MultiTokenHeads(model, num_heads=1, architecture="resblock"), tmp_path)
    assert not any(tmp_path.iterdir())
