"""The repository root, the tiny SFT config and the options that keep a run of it quick, for the CLI tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "lightning_tokens/configs/sft/tiny.yaml")
QUICK = ["--data.init_args.task.num_train", "32", "--data.init_args.task.num_val", "6",
         "--data.init_args.batch_size", "8", "--model.init_args.max_new_tokens", "4",
         "--trainer.enable_progress_bar", "false"]
