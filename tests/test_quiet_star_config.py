"""Quiet-STaR configs parse and run through the CLI; the plain-text data module's batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_tokens.cli import build_cli
from lightning_tokens.data.reasoning_task import ReasoningTask, render_prompt
from lightning_tokens.data.tokenizer import load_task_tokenizer
from lightning_tokens.quiet_star import QuietSTaRModule
from lightning_tokens.quiet_star.data import PlainTextDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "quiet_star"


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


def test_plain_text_batches_and_task_prompts():
    data = PlainTextDataModule(task=ReasoningTask(num_train=6, num_val=3), max_length=24, batch_size=3)
    data.setup()
    tokenizer = data.tokenizer
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 24
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    val = next(iter(data.val_dataloader()))
    problems = ReasoningTask(num_train=6, num_val=3).problems("val")
    assert val["answers"] == [str(p.answer) for p in problems]
    prompt = tokenizer.decode(val["prompt_input_ids"][0][val["prompt_attention_mask"][0].bool()],
                              skip_special_tokens=True)
    assert prompt == render_prompt(problems[0]) + "\n"


def test_plain_text_files(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("one two three\n\nfour five\n\nsix seven eight nine\n\n\n")
    data = PlainTextDataModule(train_file=str(path), val_fraction=0.34, max_length=8, batch_size=4)
    data.setup()
    assert len(data.train_docs) + len(data.val_docs) == 3 and len(data.val_docs) == 1
    tokenizer = load_task_tokenizer()
    texts = {tokenizer.decode(d, skip_special_tokens=True) for d in data.train_docs + data.val_docs}
    assert {t[:3] for t in texts} == {"one", "fou", "six"}
    with pytest.raises(ValueError, match="no such file"):
        PlainTextDataModule(train_file=str(tmp_path / "missing.txt")).setup()
