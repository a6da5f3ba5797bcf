"""Tiny models with CAFT heads, a padded batch and its trunk, and short Trainer runs, shared by the CAFT tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_tokens.caft import MultiTokenHeads, capture_trunk
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config


def build(model_type="llama", attn="sdpa", **heads_kwargs):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type), attn_implementation=attn))
    model.eval()
    return model, MultiTokenHeads(model, **heads_kwargs).eval()


def batch(vocab=100, length=14):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def trunk_of(model, ids, mask):
    with capture_trunk(model) as holder:
        logits = model(input_ids=ids, attention_mask=mask).logits
    return holder["trunk"], logits


def trainer(**kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    options.update(kwargs)
    return pl.Trainer(**options)


def task_data(**kwargs):
    return SFTDataModule(task=ReasoningTask(num_train=24, num_val=8), max_length=64, batch_size=4, **kwargs)
