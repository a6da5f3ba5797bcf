"""The LightningCLI of ``lightning-tokens`` (lightning_tokens/cli/lightning_cli.py): every packaged YAML
(lightning_tokens/configs/) instantiates offline, tiny configs fit, resume, DDP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lightning_tokens.cli import build_cli
from tests.cli.options import ROOT
from tests.tiny import Interrupt

CONFIG_DIR = ROOT / "lightning_tokens" / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
TINY_CONFIGS = [c for c in CONFIGS if c.stem.endswith("tiny")]
SMALL_TASK = ["--data.init_args.task.num_train", "48", "--data.init_args.task.num_val", "8"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_parses_and_instantiates_without_downloading(config, offline_hub, tmp_path):
    # GPU configs are instantiated on the CPU; everything else is as written.
    cli = build_cli(["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                     "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    text = config.read_text()
    if "name_or_path:" in text:
        assert offline_hub, f"{config.name} names a hub model but none was requested"


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_fit_fast_dev_run_on_every_tiny_config(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "--config", str(config), "--trainer.fast_dev_run", "2", *SMALL_TASK])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_accepts_packing(config, offline_hub, tmp_path):
    cli = build_cli(["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                     "--trainer.default_root_dir", str(tmp_path), "--data.init_args.packing", "true"], run=False)
    assert cli.datamodule.packing is True


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_fit_fast_dev_run_on_every_tiny_config_packed(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", str(config), "--trainer.fast_dev_run", "2", *SMALL_TASK,
                     "--data.init_args.packing", "true"])
    loader = cli.datamodule.train_dataloader()
    assert len(loader) < -(-len(loader.dataset.dataset) // cli.datamodule.batch_size)  # fewer batches than padded
    assert "position_ids" in next(iter(loader))
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == min(2, len(loader))



def _fit(tmp_path, *extra, interrupt_at=None, ckpt_path=None, config="configs/sft/tiny.yaml"):
    args = ["--config", str(ROOT / config), *SMALL_TASK, "--trainer.max_epochs", "3",
            "--data.init_args.batch_size", "8", "--model.init_args.max_new_tokens", "8",
            "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--checkpoint.dirpath", str(tmp_path / "checkpoints"), *extra]
    cli = build_cli(args, run=False)
    if interrupt_at is None:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return cli
    cli.trainer.callbacks.append(Interrupt(interrupt_at))
    with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits with status 1
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


PACKED = ["--data.init_args.packing", "true", "--data.init_args.batch_size", "2"]


@pytest.mark.parametrize("config,interrupt_at,every_n_steps,packing", [
    ("configs/sft/tiny.yaml", 6, None, False), ("configs/sft/tiny.yaml", 9, "1", False),
    ("configs/sft/qlora-tiny.yaml", 9, "1", False), ("configs/sft/tiny.yaml", 5, "1", True),
], ids=["epoch-boundary", "mid-epoch", "qlora-mid-epoch", "packed-mid-epoch"])
def test_interrupted_run_resumes_to_the_same_weights_and_metrics(tmp_path, config, interrupt_at, every_n_steps,
                                                                 packing):
    extra = ["--checkpoint.every_n_train_steps", every_n_steps] if every_n_steps else []
    extra += PACKED if packing else []
    straight = _fit(tmp_path / "a", *extra, config=config)
    interrupted = _fit(tmp_path / "b", *extra, interrupt_at=interrupt_at, config=config)
    assert interrupted.trainer.global_step == interrupt_at and interrupted.trainer.interrupted
    resumed = _fit(tmp_path / "b", *extra, ckpt_path="last", config=config)
    assert straight.model.state_dict().keys() == resumed.model.state_dict().keys()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    for key in ("val/loss", "val/ppl", "train/loss"):
        torch.testing.assert_close(straight.trainer.callback_metrics[key], resumed.trainer.callback_metrics[key])
    assert resumed.trainer.global_step == straight.trainer.global_step
    batches = len(straight.datamodule.train_dataloader())
    assert straight.trainer.global_step == 3 * batches
    assert batches == 6 or (packing and interrupt_at % batches)  # the packed run is interrupted mid-epoch too


def test_fit_under_ddp_with_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    command = [sys.executable, "-m", "lightning_tokens.cli", "fit", "--config", "sft/tiny",
               *SMALL_TASK, "--data.init_args.batch_size", "4", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
               "--trainer.limit_val_batches", "1", "--model.init_args.max_new_tokens", "4",
               "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--checkpoint.dirpath", str(tmp_path / "checkpoints")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    output = result.stderr + result.stdout
    assert "world_size: 2" in output or "distributed_backend=gloo" in output
