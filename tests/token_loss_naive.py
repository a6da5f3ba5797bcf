"""A small labelled batch and its weighted loss computed by hand, shared by tests/test_token_loss*.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB = 50


def make_batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :3] = -100  # prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def hand_loss(model, batch, weight_fn):
    """The weighted loss computed directly from the logits, independently of the dispatcher."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets.clamp_min(0).reshape(-1),
                         reduction="none").view_as(targets)
    weights = weight_fn(mask).float() * mask
    return (ce * weights).sum() / weights.sum(), (ce * mask).sum() / mask.sum()
