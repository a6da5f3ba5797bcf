"""TokenSelection (sstoken/callback.py) as a drop-in under a Trainer: YAML + CausalLMModule, a user's own
LightningModule, LoRA and QLoRA, the warmup once or every epoch."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from lightning_tokens.cli import build_cli
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.sft import CausalLMModule
from lightning_tokens.sstoken import TokenSelection
from tests.sstoken.helpers import SMALL_TASK, lora_spec
from tests.sstoken.naive import make_batch, naive_attention, naive_select, naive_token_losses
from tests.tiny import Interrupt, tiny_config, trainer


def test_yaml_config_runs_with_causal_lm_module(tmp_path):
    cli = build_cli([
        "fit", "--config", "sstoken/tiny", "--trainer.fast_dev_run", "2",
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
    with open("lightning_tokens/configs/sstoken/qwen2.5-1.5b-qlora.yaml") as f:
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



class KeptLoss(pl.Callback):
    """``selection/loss_kept`` of every optimizer step, by step number."""

    def __init__(self):
        self.values = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values[trainer.global_step] = float(trainer.callback_metrics["selection/loss_kept"])


def detector_fit(root, interrupt_at=None, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_tokens.optim import OptimizerConfig

    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(model=ModelSpec(config=tiny_config("llama")), optimizer=OptimizerConfig(lr=1e-2),
                            max_new_tokens=2)
    data = SFTDataModule(task=ReasoningTask(**{**SMALL_TASK, "num_train": 32}), batch_size=4, max_length=64)
    selection, kept = TokenSelection(mode="loss", runaway_window=3), KeptLoss()
    callbacks = [selection, kept, ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True, save_top_k=0)]
    if interrupt_at is not None:
        callbacks.append(Interrupt(interrupt_at))
    fit = trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True, default_root_dir=root)
    if interrupt_at is None:
        fit.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits with status 1
            fit.fit(module, datamodule=data)
    return selection, kept.values


def test_a_run_interrupted_mid_epoch_resumes_the_runaway_detector_exactly(tmp_path):
    """Stopped after step 5 of 8 in the first epoch, between the detector's baseline (steps 1-3) and the end: the
    resumed run's detector holds the state, and logs the kept loss, of the uninterrupted one at every step."""
    straight, straight_kept = detector_fit(tmp_path / "straight")
    first, _ = detector_fit(tmp_path / "resumed", interrupt_at=5)
    assert first.detector.baseline is not None and len(first.detector.recent) == 3
    resumed, resumed_kept = detector_fit(tmp_path / "resumed", ckpt_path=tmp_path / "resumed" / "last.ckpt")
    assert sorted(resumed_kept) == list(range(6, 17))
    for step, value in resumed_kept.items():
        assert value == pytest.approx(straight_kept[step], abs=1e-6), step
    state, expected = resumed.detector.state_dict(), straight.detector.state_dict()
    assert state["fired_step"] == expected["fired_step"]
    assert state["baseline"] == pytest.approx(expected["baseline"], abs=1e-6)
    assert [list(p) for p in state["recent"]] == [pytest.approx(list(p), abs=1e-6) for p in expected["recent"]]
