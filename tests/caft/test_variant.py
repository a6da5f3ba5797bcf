"""Head variants: one HeadVariant class per architecture, picked once by ``head_variant``, and no other code that
compares the architecture string."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightning_tokens.caft import MultiTokenHeads
from lightning_tokens.caft.heads import head_variant
from lightning_tokens.caft.layer import LayerVariant
from lightning_tokens.caft.mtp import MtpVariant
from lightning_tokens.caft.resblock import ResBlockVariant
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_tokens"


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
