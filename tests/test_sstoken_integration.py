"""TokenSelection as a drop-in: YAML + CausalLMModule, a user's own LightningModule, LoRA, QLoRA, precomputed file."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from conftest import tiny_config
from lightning_tokens.cli import build_cli
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.sft import CausalLMModule
from lightning_tokens.sstoken import LossTable, TokenSelection, score_main
from lightning_tokens.sstoken.history import DisabledAdapters
from test_sstoken import make_batch, naive_attention, naive_select, naive_token_losses

SMALL_TASK = dict(num_train=24, num_val=4, noise=0.25, noisy_fraction=0.3)


def trainer(**kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    options.update(kwargs)
    return pl.Trainer(**options)


def test_yaml_config_runs_with_causal_lm_module(tmp_path):
    cli = build_cli([
        "fit", "--config", "configs/sstoken/tiny.yaml", "--trainer.fast_dev_run", "2",
        "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path),
        "--data.init_args.task.num_train", "64", "--data.init_args.task.num_val", "8",
        "--data.init_args.batch_size", "8", "--model.init_args.max_new_tokens", "2",
    ])
    selection = [c for c in cli.trainer.callbacks if isinstance(c, TokenSelection)]
    assert len(selection) == 1 and selection[0].ratio == 0.6 and selection[0].gamma == 0.5
    metrics = cli.trainer.callback_metrics
    assert 0.6 <= metrics["selection/kept_fraction"] < 0.75
    assert math.isfinite(metrics["train/loss"])


def test_qlora_config_parses():
    with open("configs/sstoken/qwen2.5-1.5b-qlora.yaml") as f:
        config = yaml.safe_load(f)
    callback = config["trainer"]["callbacks"][0]
    TokenSelection(**callback["init_args"])
    ModelSpec(**config["model"]["init_args"]["model"])
    ReasoningTask(**config["data"]["init_args"]["task"])


class UserModule(pl.LightningModule):
    """What a user writes: an HF model called with labels, ``outputs.loss`` returned (lr 0: weights stay)."""

    def __init__(self):
        super().__init__()
        self.net = causal_lm_of(load_causal_lm(ModelSpec(config=tiny_config("llama")))[0])
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = self.net(**batch).loss
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_plain_user_module_trains_on_the_selected_tokens():
    module = UserModule()
    batch = make_batch(module.net.config.vocab_size)
    reference = copy.deepcopy(module.net)
    trainer(max_steps=1, callbacks=[TokenSelection(mode="attention", ratio=0.5)]).fit(
        module, DataLoader([batch], batch_size=None))
    attn = naive_attention(reference, batch, -1)
    kept = naive_select([{i: 0.0 for i in a} for a in attn], attn, 0.0, 0.5)
    ce = naive_token_losses(reference, batch)
    expected = sum(ce[b][i] for b in range(4) for i in kept[b]) / sum(len(k) for k in kept)
    assert module.losses[0].item() == pytest.approx(expected, rel=1e-5)
    assert not module.net._forward_hooks  # teardown detached the dispatcher


def lora_spec(**extra):
    return ModelSpec(config=tiny_config("llama"), lora=dict(r=4, lora_alpha=8, init_lora_weights=False), **extra)


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


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_lora_and_qlora_fit_with_causal_lm_module(quantization):
    module = CausalLMModule(model=lora_spec(quantization=quantization), max_new_tokens=2)
    data = SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=64)
    selection = TokenSelection(warmup=1)
    fit = trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, callbacks=[selection])
    fit.fit(module, datamodule=data)
    metrics = fit.callback_metrics
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert {"selection/rel", "selection/attention", "selection/rank_corr", "selection/loss_history"} <= set(metrics)
    assert 0.6 <= metrics["selection/kept_fraction"] < 0.8


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


def write_config(tmp_path, seed):
    with open("configs/sstoken/tiny.yaml") as f:
        config = yaml.safe_load(f)
    config["data"]["init_args"]["task"].update(SMALL_TASK, seed=seed)
    config["model"]["init_args"]["model"]["config"] = tiny_config("llama")
    path = tmp_path / f"config{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_score_command_then_precomputed_history(tmp_path):
    config = write_config(tmp_path, seed=0)
    output = tmp_path / "history.pt"
    score_main(["--config", str(config), "--output", str(output), "--device", "cpu", "--batch_size", "5"])
    table = LossTable.load(output)
    assert len(table.index) == SMALL_TASK["num_train"]

    module = CausalLMModule(model=ModelSpec(config=tiny_config("llama")), max_new_tokens=2)
    data = SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=128)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    # the stored losses are the initial model's per-token losses of exactly these samples
    expected = naive_token_losses(module.model, batch)
    looked_up = table.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    for b, row in enumerate(expected):
        for i, value in row.items():
            assert looked_up[b, i - 1].item() == pytest.approx(value, rel=1e-5, abs=1e-6)

    selection = TokenSelection(history="precomputed", history_file=str(output), warmup=0)
    fit = trainer(max_steps=2, callbacks=[selection])
    fit.fit(module, datamodule=SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=128))
    assert math.isfinite(fit.callback_metrics["selection/rel"])


def test_precomputed_file_for_other_data_is_refused(tmp_path):
    output = tmp_path / "history.pt"
    score_main(["--config", str(write_config(tmp_path, seed=1)), "--output", str(output), "--device", "cpu"])
    module = CausalLMModule(model=ModelSpec(config=tiny_config("llama")), max_new_tokens=2)
    selection = TokenSelection(history="precomputed", history_file=str(output))
    with pytest.raises(ValueError, match="does not match the training data: \\d+ of 24 samples missing"):
        trainer(max_steps=1, callbacks=[selection]).fit(
            module, datamodule=SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=128))
    with pytest.raises(FileNotFoundError, match="history_file"):
        TokenSelection(history="precomputed", history_file=str(tmp_path / "none.pt")).attach(module.model)


class GammaRecorder(pl.Callback):
    """Reads the gamma TokenSelection will use for each batch (after its own batch-start hook)."""

    def __init__(self, selection):
        self.selection, self.gammas = selection, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.gammas.append(self.selection.current_gamma())


@pytest.mark.parametrize("per_epoch,expected", [
    (False, [0.0] * 4 + [0.5] * 6),  # the first 40% of all 10 steps
    (True, [0.0, 0.0, 0.5, 0.5, 0.5] * 2),  # the first 40% of each epoch's 5 batches
])
def test_warmup_once_or_at_every_epoch(per_epoch, expected):
    module = CausalLMModule(model=ModelSpec(config=tiny_config("llama")), max_new_tokens=2)
    data = SFTDataModule(task=ReasoningTask(**{**SMALL_TASK, "num_train": 20}), batch_size=4, max_length=64)
    selection = TokenSelection(warmup=0.4, warmup_per_epoch=per_epoch)
    recorder = GammaRecorder(selection)
    trainer(max_epochs=2, callbacks=[selection, recorder]).fit(module, datamodule=data)
    assert recorder.gammas == expected
