"""QuietSTaRModule through the CLI: the packaged quiet_star configs parse, and the tiny one runs a step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_tokens.cli import build_cli
from lightning_tokens.quiet_star import QuietSTaRModule

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "lightning_tokens" / "configs" / "quiet_star"


def test_tiny_config_builds_and_runs_a_step(tmp_path):
    cli = build_cli(["--config", str(CONFIGS / "tiny.yaml"), "--trainer.fast_dev_run", "1",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                     "--checkpoint.dirpath", str(tmp_path / "checkpoints"), "--trainer.logger", "false",
                     "--model.init_args.max_new_tokens", "2", "--model.init_args.thought_length", "2",
                     "--data.init_args.task.num_train", "16", "--data.init_args.task.num_val", "4",
                     "--data.init_args.eval_batch_size", "4"], run=False)
    assert isinstance(cli.model, QuietSTaRModule)
    assert (cli.model.n_thoughts, cli.model.n_ahead_talk) == (2, 4)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "tiny.yaml"))
def test_hub_configs_parse(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lightning_tokens.cli", "fit", "--config", str(CONFIGS / name),
                             "--print_config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "QuietSTaRModule" in result.stdout
