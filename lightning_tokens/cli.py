"""The ``lightning-tokens`` command: a LightningCLI over the project's modules and data modules.

``lightning-tokens fit --config configs/sft/tiny.yaml`` trains; ``validate``, ``test`` and ``predict``
work as in any LightningCLI. ``lightning-tokens score`` writes per-token history losses for token
selection and ``lightning-tokens collect-traces`` collects a model's reasoning traces for budget guidance. Models and data modules are chosen by ``class_path`` (subclass mode), so
every LightningModule and LightningDataModule of the project, or of the user, can be named in a YAML.
By default the trainer shows a Rich progress bar, logs to CSV under ``runs/`` and keeps the ``last``
checkpoint (settable as ``checkpoint.*`` in the YAML).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}


class TokensCLI(LightningCLI):
    """LightningCLI with a progress bar and a checkpoint callback that keeps ``last`` by default."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # A Rich progress bar unless the YAML turns bars off or brings its own.
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> TokensCLI:
    """Build (and by default run) the CLI on ``args`` (default ``sys.argv[1:]``)."""
    return TokensCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def _score(argv: list[str]) -> None:
    from lightning_tokens.selection.scoring import score_main

    score_main(argv)


def _collect_traces(argv: list[str]) -> None:
    from lightning_tokens.budget.traces import collect_main

    collect_main(argv)


#: Commands beside LightningCLI's own (fit, validate, test, predict).
EXTRA_COMMANDS = {
    "score": _score,  # per-token history losses for TokenSelection(history="precomputed")
    "collect-traces": _collect_traces,  # a frozen model's own reasoning traces, for budget guidance
}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-tokens`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[argv[0]](argv[1:])
        return
    build_cli(argv)


if __name__ == "__main__":
    main()
