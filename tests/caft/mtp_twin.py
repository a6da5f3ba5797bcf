"""Tiny models with MTP layers and their twin in transformers' own ``MtpModel``, shared by the MTP tests."""

from __future__ import annotations

import torch
from transformers.modeling_layers import MtpModel

from lightning_tokens.caft import MultiTokenHeads
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config

MODEL_TYPES = ["deepseek_v3", "glm4_moe"]


ROWS = [[1, 7, 9, 11, 13, 4, 22], [1, 30, 2, 2, 40], [5, 6, 8, 10, 12, 14, 16, 18, 20]]


def tiny(model_type: str, **overrides):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type, initializer_range=0.2, **overrides)))
    return model.eval()


def noisy(heads: MultiTokenHeads) -> MultiTokenHeads:
    with torch.no_grad():  # norms away from 1 and a mixed projection, so every weight matters
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return heads


def twin(model, heads) -> MtpModel:
    """transformers' own MtpModel holding the heads' weights."""
    mtp = MtpModel(model, heads.num_heads).eval()
    mtp.layers.load_state_dict(heads.blocks.state_dict())
    return mtp
