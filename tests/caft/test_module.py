"""MultiTokenHeadsModule (CAFT stage 1): it trains the heads only, on a frozen base, and writes them when the fit
ends, never after an interrupted one; fresh MTP layers too."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens.caft import MultiTokenHeads, MultiTokenHeadsModule
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.optim import OptimizerConfig
from tests.caft.builders import task_data
from tests.tiny import tiny_config, trainer


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)  # tiny random models carry denormal weights: slow CPU matmuls otherwise
    yield
    torch.set_flush_denormal(False)


def test_stage1_trains_heads_only_and_writes_them(tmp_path):
    module = MultiTokenHeadsModule(model=ModelSpec(config=tiny_config("llama")), num_heads=2,
                                   optimizer=OptimizerConfig(lr=1e-2, warmup=0), heads_path=str(tmp_path / "heads"))
    base_before = copy.deepcopy(module.model.state_dict())
    heads_before = copy.deepcopy(module.heads.state_dict())
    run = trainer(max_steps=3, limit_val_batches=1, val_check_interval=3)
    run.fit(module, datamodule=task_data())
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, base_before[name]), name  # bit-identical
    assert any(not torch.equal(t, heads_before[n]) for n, t in module.heads.state_dict().items())
    assert {"val/loss", "val/head1_acc", "val/head2_acc", "train/head1_loss"} <= set(run.logged_metrics)
    loaded = MultiTokenHeads.load(tmp_path / "heads", module.model)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, module.heads.state_dict()[name]), name
    run.save_checkpoint(tmp_path / "stage1.ckpt")
    state = torch.load(tmp_path / "stage1.ckpt", weights_only=True)["state_dict"]
    assert state and all(key.startswith(("heads.", "val_")) for key in state)  # the heads, not the base


def test_stage1_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        MultiTokenHeadsModule(model=ModelSpec(config=tiny_config("llama")), gamma=0.0)


@pytest.mark.parametrize("stop", ["sigterm", "interrupt"])
def test_an_interrupted_stage1_writes_no_heads(tmp_path, stop):
    import os
    import signal

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0 and stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif batch_idx == 0:
                raise KeyboardInterrupt  # Ctrl-C: Lightning shuts the fit down gracefully

    module = MultiTokenHeadsModule(model=ModelSpec(config=tiny_config("llama")), num_heads=1,
                                   optimizer=OptimizerConfig(lr=1e-2, warmup=0), heads_path=str(tmp_path / "heads"))
    run = trainer(max_steps=5, callbacks=[Stop()])
    try:
        run.fit(module, datamodule=task_data())
    except (Exception, SystemExit, KeyboardInterrupt):
        pass  # how Lightning ends an interrupted fit varies by version; what matters is what it leaves behind
    assert run.global_step < 5
    assert not (tmp_path / "heads").exists()


def test_stage1_trains_fresh_mtp_layers(tmp_path):
    module = MultiTokenHeadsModule(model=ModelSpec(config=tiny_config("glm4_moe")), num_heads=2, architecture="mtp",
                                   optimizer=OptimizerConfig(lr=1e-2, warmup=0), heads_path=str(tmp_path / "heads"))
    base_before = copy.deepcopy(module.model.state_dict())
    heads_before = copy.deepcopy(module.heads.state_dict())
    trainer(max_steps=2).fit(module, datamodule=task_data())
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, base_before[name]), name
    assert any(not torch.equal(t, heads_before[n]) for n, t in module.heads.state_dict().items())
    loaded = MultiTokenHeads.load(tmp_path / "heads", module.model)
    assert loaded.architecture == "mtp"
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, module.heads.state_dict()[name]), name
