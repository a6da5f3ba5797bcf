"""The ``lightning-tokens`` command: a LightningCLI over the project's modules and data modules.

``lightning-tokens fit --config sft/tiny`` trains; ``validate`` and ``test`` evaluate
(``test`` logs under ``test/``); ``predict`` writes greedy completions of held-out prompts (or of
``--data.init_args.predict_file``) to ``<default_root_dir>/predictions.jsonl``. ``lightning-tokens score``
writes per-token history losses for token selection and ``lightning-tokens collect-traces`` collects a
model's reasoning traces for budget guidance. Models and data modules are chosen by ``class_path``
(subclass mode), so every LightningModule and LightningDataModule of the project, or of the user, can be
named in a YAML. By default the trainer shows a Rich progress bar, logs to CSV under ``runs/`` and keeps
the ``last`` checkpoint, overwritten by each run into the same folder (settable as ``checkpoint.*``).

A bad value (a YAML field, a command-line option, a checkpoint or data file) ends the command with one
line naming it and exit status 2, not a traceback.

The package runs one way: :mod:`~lightning_tokens.cli.main` (the console script),
:mod:`~lightning_tokens.cli.lightning_cli` (the LightningCLI and :func:`build_cli`) and
:mod:`~lightning_tokens.cli.commands` (the other commands) import the library; no library module imports them.
"""

from lightning_tokens.cli.commands import EXTRA_COMMANDS, collect_main, score_main
from lightning_tokens.cli.lightning_cli import (
    CKPT_KEYWORDS,
    EXTRA_HELP,
    TRAINER_DEFAULTS,
    ConfigError,
    TokensCLI,
    build_cli,
)
from lightning_tokens.cli.main import main

__all__ = ["CKPT_KEYWORDS", "EXTRA_COMMANDS", "EXTRA_HELP", "TRAINER_DEFAULTS", "ConfigError", "TokensCLI",
           "build_cli", "collect_main", "main", "score_main"]
