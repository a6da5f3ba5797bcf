"""Naive references shared by the ssToken tests: a padded batch, per-token losses, eager attention, the selection."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lightning_tokens.modeling import causal_lm_of


def make_batch(vocab, left_pad=False, seed=3):
    """4 samples: prompts of 3-5 tokens, responses of 2-7 tokens, padded (right or left)."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [3, 5, 4, 3], [7, 2, 6, 5]
    length = max(p + r for p, r in zip(prompts, responses))
    ids = torch.zeros(4, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        n = p + r
        start = length - n if left_pad else 0
        row = torch.randint(5, vocab, (n,), generator=g)
        ids[b, start:start + n] = row
        mask[b, start:start + n] = 1
        labels[b, start + p:start + n] = row[p:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def naive_token_losses(model, batch):
    """Per-sample dict {input position i: CE of predicting token i} over response tokens (eval mode)."""
    model = causal_lm_of(model)
    was_training = model.training
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    out = []
    for b in range(batch["input_ids"].shape[0]):
        row = {}
        for i in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, i] != -100:
                row[i] = F.cross_entropy(logits[b, i - 1], batch["labels"][b, i]).item()
        out.append(row)
    return out


def naive_attention(model, batch, layer):
    """Per-sample {i: head-mean attention mass from query i to context positions}, from eager attention."""
    base = causal_lm_of(model)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), attn_implementation="eager")
    eager.load_state_dict(base.state_dict())
    eager.eval()
    with torch.no_grad():
        attentions = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_attentions=True).attentions[layer]
    out = []
    for b in range(batch["input_ids"].shape[0]):
        context = [j for j in range(batch["input_ids"].shape[1])
                   if batch["attention_mask"][b, j] == 1 and batch["labels"][b, j] == -100]
        row = {}
        for i in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, i] != -100:
                row[i] = attentions[b, :, i, context].sum(-1).mean().item()
        out.append(row)
    return out


def naive_select(rel_rows, attn_rows, gamma, ratio):
    """Kept input positions per sample, straight from the formulas."""
    kept = []
    for rel, attn in zip(rel_rows, attn_rows):
        positions = sorted(attn)
        if not positions:
            kept.append(set())
            continue
        values = [rel[i] for i in positions]
        low, high = min(values), max(values)
        score = {i: gamma * (rel[i] - low) / (high - low + 1e-8) + (1 - gamma) * attn[i] for i in positions}
        k = math.ceil(round(ratio * len(positions), 6))
        ranked = sorted(positions, key=lambda i: (-score[i], i))
        kept.append(set(ranked[:k]))
    return kept


def naive_loss(model, batch, kept):
    losses = naive_token_losses(model, batch)
    values = [losses[b][i] for b in range(len(kept)) for i in kept[b]]
    return sum(values) / len(values)
