"""Mixture-of-experts models keep their router load-balancing loss through the loss dispatcher.

Run with ``output_router_logits``, transformers' MoE causal LMs add ``router_aux_loss_coef * aux_loss`` to the
cross-entropy; every training forward the dispatcher computes must give that same loss and the same gradients.
"""

from __future__ import annotations

import random

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens.data.encode import Encoded
from lightning_tokens.data.packing import PackedCollator
from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher, UnsupportedLoss
from tests.lean_loss_naive import assert_same_gradients, gradients, selected_step
from tests.tiny import padded_rows

VOCAB = 53
COEF = 0.05  # larger than the usual 0.001, so that a dropped term stands far out of the tolerance
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE_SIZES = {
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def moe_config(model_type: str, router: bool = True, **overrides) -> dict:
    """Config dict of a 2-layer, 32-wide MoE model with 4 experts (top 2)."""
    return {"model_type": model_type, **BASE, **MOE_SIZES[model_type], "output_router_logits": router,
            "router_aux_loss_coef": COEF, **overrides}


def build(model_type: str, router: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = dict(moe_config(model_type, router, vocab_size=VOCAB))
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).train()


def rows(seed: int = 0) -> list[list[int]]:
    generator = random.Random(seed)
    return [[generator.randrange(1, VOCAB) for _ in range(n)] for n in (9, 6, 8)]


def padded(side: str) -> dict:
    ids, mask = padded_rows(rows(), 9, side)
    labels = ids.masked_fill(mask == 0, -100)
    for b in range(ids.shape[0]):  # the first two real tokens of each row are prompt
        labels[b, mask[b].nonzero()[:2, 0]] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed() -> dict:
    """Two packed rows (position ids restarting at each sample, no attention mask), the second padded at the end."""
    samples = [Encoded(ids, [-100] * 2 + ids[2:], 2, f"sample {i}") for i, ids in enumerate(rows() + rows(1)[:1])]
    batch = PackedCollator(pad_token_id=0)([[samples[0], samples[1]], [samples[2], samples[3]]])
    batch["use_cache"] = False  # as the collator gives it: transformers' reference must not hide the boundaries
    return batch


BATCHES = {"right": lambda: padded("right"), "left": lambda: padded("left"), "packed": packed}


def transformers_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """The model's own loss on ``batch`` (no dispatcher) and its gradients."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), gradients(model)


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("layout", sorted(BATCHES))
@pytest.mark.parametrize("router", [True, False], ids=["router", "no-router"])
@pytest.mark.parametrize("model_type", sorted(MOE_SIZES))
def test_dispatched_loss_and_gradients_equal_transformers_own(model_type, router, layout):
    model = build(model_type, router)
    batch = BATCHES[layout]()
    expected, expected_grads = transformers_loss(model, batch)
    with torch.no_grad():
        output = model(**{k: v for k, v in batch.items() if k != "labels"})
    cross_entropy = next_token_ce(output.logits, batch["labels"])
    if router:  # the term is there and large enough for the tolerance below to see it dropped
        torch.testing.assert_close(expected - cross_entropy, COEF * output.aux_loss, rtol=0, atol=1e-6)
        assert (expected - cross_entropy).abs() > 1e-3
    else:
        assert "aux_loss" not in output
        torch.testing.assert_close(expected, cross_entropy, rtol=0, atol=1e-6)

    dispatcher = TokenLossDispatcher.for_model(model)
    handler = PlainLoss()
    dispatcher.add(handler)
    try:
        for _ in range(2):  # the first forward also checks the model's own loss on one position
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-5)
            assert_same_gradients(gradients(model), expected_grads)
    finally:
        dispatcher.remove(handler)


def test_keep_logits_and_lora_keep_the_router_term():
    from lightning_tokens.modeling import ModelSpec, load_causal_lm

    spec = ModelSpec(config=moe_config("qwen2_moe"), lora=dict(r=4, lora_alpha=8, lora_dropout=0.0))
    model, _ = load_causal_lm(spec)
    model.train()
    assert any("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    batch = padded("right")
    expected, expected_grads = transformers_loss(model, batch)
    for keep_logits in (False, True):
        dispatcher = TokenLossDispatcher.for_model(model)
        handler = PlainLoss(keep_logits=keep_logits)
        dispatcher.add(handler)
        try:
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
        finally:
            dispatcher.remove(handler)
        torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-5)
        assert_same_gradients(gradients(model), expected_grads)


def test_causal_lm_module_logs_the_router_term_and_validates_on_the_cross_entropy(tmp_path):
    from lightning_tokens import CausalLMModule
    from lightning_tokens.modeling import ModelSpec

    module = CausalLMModule(ModelSpec(config=moe_config("qwen3_moe")), generation_batches=0)
    batch = padded("left")
    module.model.train()
    with torch.no_grad():
        output = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    router = COEF * output.aux_loss
    cross_entropy = next_token_ce(output.logits, batch["labels"])
    loader = DataLoader([batch], batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["train/router_loss"], router, rtol=0, atol=1e-6)
    torch.testing.assert_close(logged["train/loss"], cross_entropy + router, rtol=0, atol=1e-5)
    module.model.eval()  # validation ran after the step, on the updated weights
    with torch.no_grad():
        output = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert output.aux_loss > 0  # there was a router term to leave out
    torch.testing.assert_close(logged["val/loss"], next_token_ce(output.logits, batch["labels"]), rtol=0, atol=1e-5)


def test_without_router_logits_nothing_is_logged(tmp_path):
    from lightning_tokens import CausalLMModule
    from lightning_tokens.modeling import ModelSpec

    module = CausalLMModule(ModelSpec(config=moe_config("mixtral", router=False)), generation_batches=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([padded("right")], batch_size=None))
    assert "train/loss" in trainer.callback_metrics and "train/router_loss" not in trainer.callback_metrics


@pytest.mark.parametrize("layout", ["left", "packed"])
def test_token_selection_trains_on_its_tokens_plus_the_router_term(layout):
    """With 0/1 weights, the selected loss is transformers' own loss with the dropped targets labelled -100."""
    from lightning_tokens import TokenSelection

    model = build("mixtral")
    batch = BATCHES[layout]()
    selection = TokenSelection(ratio=0.5, warmup=0)  # ssToken: history from a frozen copy, attention at the last layer
    selection.attach(model)
    loss, kept = selected_step(selection, model, batch)
    grads = gradients(model)
    targets = batch["labels"][:, 1:] != -100
    assert 0 < (kept & targets).sum() < targets.sum()
    labels = batch["labels"].clone()
    labels[:, 1:][~kept] = -100
    expected, expected_grads = transformers_loss(model, {**batch, "labels": labels})
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-5)
    assert_same_gradients(grads, expected_grads)
    # the history model (a frozen copy of these same weights) gives the plain cross-entropy, no router term
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(selection.metrics["loss_history"], next_token_ce(logits, batch["labels"]), rtol=0,
                               atol=1e-5)


def test_caft_adds_its_heads_to_transformers_own_loss():
    from lightning_tokens import ConceptAwareFineTuning
    from lightning_tokens.caft import capture_trunk

    model = build("qwen2_moe")
    holder = pl.LightningModule()
    holder.net = model
    caft = ConceptAwareFineTuning(num_heads=2, beta=0.5, train_heads=True)
    with pytest.warns(UserWarning, match="untrained"):
        caft.setup(None, holder, "fit")
    caft.total_steps, caft.step = 4, 1
    batch = padded("right")
    try:
        loss = model(**batch).loss
        loss.backward()
    finally:
        caft.teardown(None, holder, "fit")
    grads = gradients(holder)
    holder.zero_grad()
    with capture_trunk(model) as trunk:
        expected = model(**batch).loss  # transformers' own: cross-entropy plus the router term
    for k, logits in enumerate(holder.caft_heads(model, trunk["trunk"], batch["attention_mask"]), start=1):
        shift = 1 + k
        ce = F.cross_entropy(logits[:, :-shift].flatten(0, 1).float(), batch["labels"][:, shift:].flatten(),
                             ignore_index=-100)
        expected = expected + 0.5 * caft.schedule_weight * 0.8 ** k * ce
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=0, atol=1e-5)
    assert any(name.startswith("caft_heads.") for name in grads)
    assert_same_gradients(grads, gradients(holder))


# -- loss terms the dispatcher cannot reproduce are refused, never dropped ------------------------------------
def dispatched_loss(model, batch):
    dispatcher = TokenLossDispatcher.for_model(model)
    handler = PlainLoss()
    dispatcher.add(handler)
    try:
        return model(**batch).loss
    finally:
        dispatcher.remove(handler)


def test_an_unknown_loss_field_is_refused_by_name():
    model = build("qwen2_moe")

    def z_loss(module, args, kwargs, output):
        output["router_z_loss"] = output.aux_loss * 0.1

    model.register_forward_hook(z_loss, with_kwargs=True)
    with pytest.raises(UnsupportedLoss, match="'router_z_loss'"):
        dispatched_loss(model, padded("right"))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "llama"])
def test_a_term_no_field_names_is_caught_on_the_first_forward(model_type):
    if model_type == "llama":
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", vocab_size=VOCAB, **BASE)
        model = AutoModelForCausalLM.from_config(config).train()
    else:
        model = build(model_type)

    def hidden_term(module, args, kwargs, output):
        if kwargs.get("labels") is not None:  # as a forward adding a term to its loss would
            output.loss = output.loss + 1e-3

    model.register_forward_hook(hidden_term, with_kwargs=True)
    with pytest.raises(UnsupportedLoss, match="own loss differs by 0.001"):
        dispatched_loss(model, padded("left"))


def test_quiet_star_adds_the_router_term_of_its_text_pass():
    """The term equals the one transformers' own forward on the batch adds; the rest of the loss is unchanged."""
    from lightning_tokens import QuietSTaRModule
    from lightning_tokens.modeling import ModelSpec

    module = QuietSTaRModule(ModelSpec(config=moe_config("qwen2_moe")), n_thoughts=2, thought_length=2,
                             n_ahead_talk=2, policy_weight=1.0)
    module.train()
    batch = padded("left")
    ids, mask = batch["input_ids"] + 5, batch["attention_mask"]  # clear of the tokenizer's special ids
    with torch.no_grad():
        expected = COEF * module.lm(input_ids=ids, attention_mask=mask).aux_loss
        out = module.quiet_star(ids, mask, temperature=0.0)
        module.lm.config.output_router_logits = False
        without = module.quiet_star(ids, mask, temperature=0.0)
    torch.testing.assert_close(out.router_loss, expected, rtol=0, atol=1e-6)
    assert expected > 1e-3 and without.router_loss is None and "router_loss" not in without.metrics()
    torch.testing.assert_close(out.loss, without.loss + expected, rtol=0, atol=1e-5)
    assert "router_loss" in out.metrics()
