"""Optimizers and learning-rate schedules (lightning_tokens/optim.py)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig, SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.optim import build_optimizer, lr_factor, parameter_groups
from tests.tiny import tiny_config


def test_warmup_then_cosine_linear_constant():
    total, warm = 110, 10
    assert [lr_factor(s, total, warm, "cosine", 0.0) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, total, warm, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(60, total, warm, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(35, total, warm, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(60, total, warm, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(110, total, warm, "linear", 0.0) == pytest.approx(0.0)
    assert lr_factor(100, total, warm, "constant", 0.0) == 1.0


def test_weight_decay_skips_vectors_and_8bit_optimizers_build():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = parameter_groups(layer.named_parameters(), 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[0]["weight_decay"] == 0.1
    for name in ("adamw8bit", "paged_adamw8bit"):
        optimizer = build_optimizer(OptimizerConfig(name=name), groups)
        assert type(optimizer).__name__.lower().startswith(name.replace("_", ""))
    with pytest.raises(ValueError, match="OptimizerConfig.name"):
        OptimizerConfig(name="sgd")


def test_scheduler_follows_the_configured_curve():
    module = CausalLMModule(model=ModelSpec(config=tiny_config()),
                            optimizer=OptimizerConfig(lr=1e-3, warmup=0.25, schedule="linear"))
    data = SFTDataModule(task=ReasoningTask(num_train=32, num_val=4), batch_size=4)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    expected = [1e-3 * lr_factor(step, 8, 2, "linear", 0.0) for step in range(8)]
    assert lrs == pytest.approx(expected)
