"""The per-token loss contract on a plain user-style LightningModule (not one of ours)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens.token_loss import TokenLossCallback, TokenLossContext, TokenLossDispatcher
from tests.token_loss_naive import VOCAB, hand_loss, make_batch


class UserModule(pl.LightningModule):
    """What a user writes: an HF model called with labels, ``outputs.loss`` returned."""

    def __init__(self):
        super().__init__()
        config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        self.net = AutoModelForCausalLM.from_config(config)
        self.seen_train, self.seen_val = [], []

    def training_step(self, batch, batch_idx):
        loss = self.net(**batch).loss
        self.seen_train.append(loss.detach().clone())
        return loss

    def validation_step(self, batch, batch_idx):
        self.seen_val.append(self.net(**batch).loss.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class PositionWeights(TokenLossCallback):
    """Toy callback: weight of the prediction at position t is ``scale * (t + 1)``."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def reshape_token_loss(self, ctx: TokenLossContext) -> None:
        positions = torch.arange(ctx.weights.shape[1], dtype=torch.float32) + 1
        ctx.weights = ctx.weights * positions * self.scale


class DropFirstTarget(TokenLossCallback):
    """Toy callback: zero weight on each row's first target; also adds a constant extra term."""

    def reshape_token_loss(self, ctx: TokenLossContext) -> None:
        first = ctx.target_mask.float().cumsum(1) == 1
        ctx.weights = ctx.weights.masked_fill(first & ctx.target_mask, 0.0)
        ctx.extra_losses["bonus"] = torch.tensor(0.25)


def run(callbacks, module):
    batch = make_batch()
    trainer = pl.Trainer(max_steps=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, val_check_interval=1, accelerator="cpu")
    loader = DataLoader([batch], batch_size=None)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return batch


def test_reweighting_changes_training_loss_exactly_and_leaves_validation_alone():
    module = UserModule()
    reference = copy.deepcopy(module.net).train()
    batch = run([PositionWeights(scale=2.0)], module)
    positions = torch.arange(8).float() + 1
    expected, plain = hand_loss(reference, batch, lambda mask: positions.expand_as(mask) * 2.0)
    torch.testing.assert_close(module.seen_train[0], expected)
    assert not torch.allclose(expected, plain)
    torch.testing.assert_close(module.seen_val[0], plain)


def test_two_callbacks_compose_in_trainer_order():
    module = UserModule()
    reference = copy.deepcopy(module.net).train()
    batch = run([DropFirstTarget(), PositionWeights(scale=1.0)], module)

    def weights(mask):
        first = (mask.float().cumsum(1) == 1) & mask
        return (~first).float() * (torch.arange(8).float() + 1)

    expected, _ = hand_loss(reference, batch, weights)
    torch.testing.assert_close(module.seen_train[0], expected + 0.25)


def test_hooks_are_removed_after_fit_and_plain_loss_returns():
    module = UserModule()
    run([PositionWeights(scale=3.0)], module)
    assert not module.net._forward_hooks and not module.net._forward_pre_hooks
    batch = make_batch()
    module.net.train()
    _, plain = hand_loss(module.net, batch, lambda mask: mask)
    torch.testing.assert_close(module.net(**batch).loss, plain, rtol=1e-5, atol=1e-6)


def test_dispatcher_ignores_eval_forwards_and_deep_copies():
    module = UserModule()
    seen = []

    class Spy:
        def reshape_token_loss(self, ctx):
            seen.append(ctx.token_loss.shape)

    dispatcher = TokenLossDispatcher.for_model(module.net)
    dispatcher.add(Spy())
    batch = make_batch()
    module.net.eval()
    module.net(**batch)
    assert seen == []
    copied = copy.deepcopy(module.net).train()
    copied(**batch)
    assert seen == []  # the copy's hooks belong to no dispatcher
    module.net.train()
    module.net(**batch)
    assert seen == [torch.Size([3, 8])]


def test_context_mask_marks_prompt_and_excludes_padding():
    module = UserModule().train()
    captured = {}

    class Grab:
        def reshape_token_loss(self, ctx):
            captured["context"] = ctx.context_mask.clone()

    dispatcher = TokenLossDispatcher.for_model(module.net)
    grab = Grab()
    dispatcher.add(grab)
    batch = make_batch()
    module.net(**batch)
    dispatcher.remove(grab)
    expected = batch["attention_mask"].bool() & (batch["labels"] == -100)
    assert torch.equal(captured["context"], expected)
    assert captured["context"][:, :3].all() and not captured["context"][1, 7:].any()
