"""Tiny models with CAFT heads, a padded batch and its trunk, a user's own module and task data, shared by the CAFT
tests."""

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


class UserModule(pl.LightningModule):
    """A user's own LightningModule around the causal LM ``net``: its training loss is ``net(**batch).loss``, kept
    in ``seen``; SGD at learning rate 0, so the weights stay as they are."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seen = []

    def training_step(self, batch, batch_idx):
        loss = self.net(**batch).loss
        self.seen.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def user_batch(vocab):
    """3 rows of 11 tokens below ``vocab``: row 1 right-padded after 8 tokens, the first 3 tokens of each a prompt."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def task_data(**kwargs):
    return SFTDataModule(task=ReasoningTask(num_train=24, num_val=8), max_length=64, batch_size=4, **kwargs)
