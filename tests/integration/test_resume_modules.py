"""Exact mid-epoch resume of the stage-1 heads, Quiet-STaR and budget predictor modules: a run interrupted after a
checkpoint and resumed from it gives the per-step losses and final weights of the uninterrupted run.

Each run starts from ``seed_everything(0)`` and fresh objects, as a new process would; the interruption is a
``KeyboardInterrupt`` from a callback, as in tests/cli/test_lightning_cli.py's resume test. Runs stop on ``max_epochs``
(2 epochs of 4 batches), the setting in which reading ``estimated_stepping_batches`` while resuming lost the
loader's position. They are interrupted in the middle of the second epoch (after step 6) or, where no dropout draws
from torch's generators, at the end of the first (after step 4: the uninterrupted run validates and opens a new data
loader before step 5, and both draw from those generators).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tokens.budget import BudgetPredictorModule, TraceDataModule
from lightning_tokens.caft import MultiTokenHeadsModule
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.quiet_star import QuietSTaRModule
from tests.tiny import Interrupt, tiny_config

BATCHES, EPOCHS = 4, 2
# a cosine schedule with warm-up: every step's learning rate depends on the run's total steps
OPTIMIZER = OptimizerConfig(lr=1e-2, warmup=2, schedule="cosine")


def heads_run():
    module = MultiTokenHeadsModule(ModelSpec(config=tiny_config("llama")), num_heads=2, optimizer=OPTIMIZER,
                                   heads_path=None)
    return module, SFTDataModule(task=ReasoningTask(num_train=4 * BATCHES, num_val=4), max_length=64, batch_size=4)


def quiet_star_run():
    # thoughts sampled at temperature 1: the resumed run must draw the same ones
    module = QuietSTaRModule(ModelSpec(config=tiny_config("llama")), optimizer=OPTIMIZER, n_thoughts=2,
                             thought_length=2, n_ahead_talk=2, policy_weight=1.0, max_new_tokens=2)
    return module, SFTDataModule(task=ReasoningTask(num_train=2 * BATCHES, num_val=2), max_length=40, batch_size=2)


def budget_run():
    # dropout in the predictor: the resumed run must draw the same masks
    module = BudgetPredictorModule(ModelSpec(config=tiny_config("llama")), optimizer=OPTIMIZER,
                                   predictor={"d_model": 32, "depth": 1, "heads": 2, "dropout": 0.1})
    return module, TraceDataModule(task=ReasoningTask(num_train=4 * BATCHES, num_val=4, style="mixed"), max_length=64,
                                   batch_size=4)


RUNS = {"heads": heads_run, "quiet-star": quiet_star_run, "budget": budget_run}



class Losses(pl.Callback):
    """The training loss of every optimizer step, by step number (1-based)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def fit(name: str, root, interrupt_at=None, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    module, data = RUNS[name]()
    losses = Losses()
    callbacks = [losses, ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True, save_top_k=0)]
    if interrupt_at is not None:
        callbacks.append(Interrupt(interrupt_at))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                         gradient_clip_val=1.0, default_root_dir=root, callbacks=callbacks)
    if interrupt_at is None:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits with status 1
            trainer.fit(module, datamodule=data)
    return trainer, module, losses.losses


def trainable(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,interrupt_at", [("heads", 6), ("quiet-star", 6), ("budget", 6), ("heads", 4),
                                               ("quiet-star", 4)])
def test_an_interrupted_run_resumes_to_the_losses_and_weights_of_an_uninterrupted_one(tmp_path, name, interrupt_at):
    trainer, straight, straight_losses = fit(name, tmp_path / "straight")
    assert trainer.global_step == BATCHES * EPOCHS and len(trainer.train_dataloader) == BATCHES
    interrupted, _, first_losses = fit(name, tmp_path / "resumed", interrupt_at=interrupt_at)
    assert interrupted.global_step == interrupt_at and interrupted.interrupted
    trainer, resumed, resumed_losses = fit(name, tmp_path / "resumed", ckpt_path=tmp_path / "resumed" / "last.ckpt")
    assert trainer.global_step == BATCHES * EPOCHS
    assert first_losses == {step: straight_losses[step] for step in range(1, interrupt_at + 1)}
    assert sorted(resumed_losses) == list(range(interrupt_at + 1, BATCHES * EPOCHS + 1))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(straight_losses[step], rel=0, abs=1e-6), f"step {step}"
    expected, got = trainable(straight), trainable(resumed)
    assert expected.keys() == got.keys() and expected
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
