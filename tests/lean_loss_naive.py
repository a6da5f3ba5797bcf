"""Models of every kind (full, LoRA, nf4), CAFT set up on them, the CAFT loss by hand and gradient comparisons, shared
by tests/test_lean_loss.py and tests/integration/ (MoE loss, packing under every method)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import tiny_config

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
KINDS = {"full": {}, "lora": dict(lora=LORA), "nf4": dict(quantization="nf4", compute_dtype="float32", lora=LORA)}


def load(kind):
    from lightning_tokens.modeling import ModelSpec, load_causal_lm

    torch.manual_seed(0)
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(), **KINDS[kind]))
    with torch.no_grad():  # adapters that already moved the model away from its base: REL is then not zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model.train()


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(ours, theirs, atol=1e-5):
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=name)


class Kept:
    def reshape_token_loss(self, ctx):
        self.kept = ctx.weights > 0


def selected_step(selection, model, batch):
    """Forward and backward of ``model`` on ``batch`` through the attached ``selection`` (detached after): the loss
    and the ``(B, T - 1)`` mask of the targets it kept."""
    kept = Kept()
    selection.dispatcher.add(kept)
    try:
        loss = model(**batch).loss
        loss.backward()
    finally:
        selection.dispatcher.remove(kept)
        selection.detach()
    return loss, kept.kept


def naive_caft_loss(model, heads, data, beta, gamma, s):
    """CE_0 + beta s sum_k gamma^k CE_k from full logits of the model and of every head, with autograd."""
    from lightning_tokens.caft import capture_trunk

    with capture_trunk(model) as holder:
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    all_logits = [logits, *heads(model, holder["trunk"], data["attention_mask"])]
    labels, total = data["labels"], 0.0
    for k, head_logits in enumerate(all_logits):
        shift = 1 + k
        ce = F.cross_entropy(head_logits[:, :-shift].flatten(0, 1).float(), labels[:, shift:].flatten(),
                             ignore_index=-100)
        total = total + (ce if k == 0 else beta * s * gamma ** k * ce)
    return total


def caft_on(kind, architecture):
    """``(model, holder, caft)``: a model of ``kind`` in a LightningModule, with ``ConceptAwareFineTuning`` set up on
    it (2 fresh, trainable heads moved off their initial weights; beta 0.5, step 1 of 4)."""
    import lightning.pytorch as pl

    from lightning_tokens import ConceptAwareFineTuning

    model = load(kind)
    holder = pl.LightningModule()
    holder.net = model
    caft = ConceptAwareFineTuning(num_heads=2, architecture=architecture, beta=0.5, train_heads=True)
    with pytest.warns(UserWarning, match="untrained"):
        caft.setup(None, holder, "fit")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in holder.caft_heads.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    caft.total_steps, caft.step = 4, 1
    return model, holder, caft
