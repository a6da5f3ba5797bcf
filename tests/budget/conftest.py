"""Fixtures of the budget-guidance tests."""

from __future__ import annotations

import pytest

from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = load_causal_lm(ModelSpec(config=tiny_config("llama")))
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer
