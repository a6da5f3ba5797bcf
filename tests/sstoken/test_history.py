"""ssToken's history sources (sstoken/history.py): the base with LoRA adapters disabled, a full-fine-tuning copy stored
in 8 or 4 bit, and the EMA of the weights against a naive EMA, resumed exactly from a checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.sstoken import TokenSelection
from lightning_tokens.sstoken.history import DisabledAdapters, EmaWeights
from tests.sstoken.helpers import lora_spec
from tests.sstoken.naive import make_batch, naive_token_losses
from tests.tiny import tiny_config


def test_lora_history_is_the_base_with_adapters_disabled():
    model, _ = load_causal_lm(lora_spec())
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    seen = {}

    class Grab:
        def reshape_token_loss(self, ctx):
            seen["history"] = selection.source.token_loss(ctx)
            seen["current"] = ctx.token_loss.detach()

    selection = TokenSelection(warmup=0)
    selection.attach(model)
    assert isinstance(selection.source, DisabledAdapters)
    grab = Grab()
    selection.dispatcher.add(grab)
    model.train()
    model(**batch)
    selection.dispatcher.remove(grab)
    selection.detach()
    with model.disable_adapter():
        base = naive_token_losses(model, batch)
    model.train()
    target = batch["labels"][:, 1:] != -100
    expected = torch.zeros(target.shape)
    for b, row in enumerate(base):
        for i, value in row.items():
            expected[b, i - 1] = value
    torch.testing.assert_close(seen["history"], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["history"][target], seen["current"][target], atol=1e-3)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_full_finetuning_history_can_be_stored_in_8_or_4_bit(quantization):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("llama", hidden_size=64, intermediate_size=128)))
    selection = TokenSelection(history_quantization=quantization, warmup=0)
    selection.attach(model)
    selection.detach()
    assert getattr(selection.source.model, "is_quantized", False)
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    selection.attach(model)
    model.train()
    loss = model(**batch).loss
    selection.detach()
    assert torch.isfinite(loss)
    assert abs(selection.metrics["rel"]) < 0.05  # quantized copy of the same weights: REL near 0


class UserModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = causal_lm_of(load_causal_lm(ModelSpec(config=tiny_config("llama")))[0])

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Snapshots(pl.Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append([p.detach().clone() for p in pl_module.net.parameters() if p.requires_grad])


def loader():
    return DataLoader([make_batch(100, seed=s) for s in (1, 2)], batch_size=None)


def fit(epochs, callbacks, ckpt_path=None, module=None):
    module = module or UserModule()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module


def selection():
    return TokenSelection(history="ema", ema_decay=0.5, warmup=1)


def test_ema_history_follows_the_naive_ema_and_resumes_exactly(tmp_path):
    snapshots = Snapshots()
    straight = selection()
    _, module_a = fit(2, [straight, snapshots])
    assert isinstance(straight.source, EmaWeights) and straight.source.updates == 4
    init = [p.detach() for p in UserModule().net.parameters() if p.requires_grad]
    expected = init
    for params in snapshots.params:
        expected = [0.5 * s + 0.5 * p for s, p in zip(expected, params)]
    for got, want in zip(straight.source.shadow, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    first = selection()
    trainer, _ = fit(1, [first])
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = selection()
    _, module_b = fit(2, [resumed], ckpt_path=tmp_path / "half.ckpt")
    assert resumed.source.updates == 4 and resumed.global_step == 4
    for a, b in zip(module_a.parameters(), module_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.source.shadow, resumed.source.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
