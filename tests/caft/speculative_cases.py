"""Prompts, noisy heads and greedy references of the batched speculative-decoding tests (also run on CUDA)."""

from __future__ import annotations

import torch

from lightning_tokens.caft import MultiTokenHeads
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config

PROMPTS = [[1, 7, 9, 11], [1, 30, 2, 2, 40, 41], [5, 6]]


MAX_NEW = 14


def noisy_heads(model_type, architecture, attn="sdpa"):
    # a wider initialisation than the default: a default tiny model repeats its last prompt token forever
    config = tiny_config(model_type, initializer_range=0.2)
    model, _ = load_causal_lm(ModelSpec(config=config, attn_implementation=attn))
    model.eval()
    heads = MultiTokenHeads(model, num_heads=3, architecture=architecture).eval()
    with torch.no_grad():  # imperfect drafts, so that both acceptance and rejection happen
        for p in heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, heads


def greedy(model, ids, mask, eos):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                          pad_token_id=0, eos_token_id=eos)


def early_eos(model, ids, mask):
    """A token that one row first emits after a few tokens and no other row emits at all, and that row."""
    free = greedy(model, ids, mask, None)[:, ids.shape[1]:]
    for b, row in enumerate(free.tolist()):
        others = set(free[[i for i in range(free.shape[0]) if i != b]].flatten().tolist())
        for i in range(3, MAX_NEW // 2):
            if row[i] not in others and row[i] not in row[:i] and row[i] != 0:
                return row[i], b
    raise AssertionError("no token ends exactly one row early; change the prompts")
