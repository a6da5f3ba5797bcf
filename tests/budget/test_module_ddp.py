"""Budget predictor training (budget/module.py) under DDP: two CPU processes (gloo), the CLI and the tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_tokens.budget import BudgetPredictor

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_training_with_two_cpu_processes(tmp_path):
    out = tmp_path / "p.pt"
    command = [sys.executable, "-m", "lightning_tokens.cli", "fit", "--config", "budget/tiny",
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
               "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
               "--trainer.enable_progress_bar", "false", "--data.init_args.task.num_train", "32",
               "--data.init_args.task.num_val", "8", "--data.init_args.batch_size", "4",
               "--model.init_args.predictor_path", str(out), "--trainer.default_root_dir", str(tmp_path),
               "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert BudgetPredictor.load(out).config.num_states == 5  # the tiny llama's 4 layers + 1
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
