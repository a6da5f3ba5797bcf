"""The ``lightning-tokens`` command: a LightningCLI over the project's modules and data modules.

``lightning-tokens fit --config configs/sft/tiny.yaml`` trains; ``validate`` and ``test`` evaluate
(``test`` logs under ``test/``); ``predict`` writes greedy completions of held-out prompts (or of
``--data.init_args.predict_file``) to ``<default_root_dir>/predictions.jsonl``. ``lightning-tokens score``
writes per-token history losses for token selection and ``lightning-tokens collect-traces`` collects a
model's reasoning traces for budget guidance. Models and data modules are chosen by ``class_path``
(subclass mode), so every LightningModule and LightningDataModule of the project, or of the user, can be
named in a YAML. By default the trainer shows a Rich progress bar, logs to CSV under ``runs/`` and keeps
the ``last`` checkpoint, overwritten by each run into the same folder (settable as ``checkpoint.*``).

A bad value (a YAML field, a command-line option, a checkpoint or data file) ends the command with one
line naming it and exit status 2, not a traceback.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_tokens.checkpoints import check_checkpoint_file, check_writable_dir
from lightning_tokens.data.records import DataError
from lightning_tokens.predict import PredictionWriter

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}

EXTRA_HELP = ("More commands: 'lightning-tokens score' writes per-token history losses for "
              "TokenSelection(history=\"precomputed\"); 'lightning-tokens collect-traces' collects a frozen "
              "model's own reasoning traces for budget guidance. Each takes --help.")


class ConfigError(ValueError):
    """A value the command cannot run with; the console script prints the message alone and exits with 2."""


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


class TokensCLI(LightningCLI):
    """LightningCLI with a progress bar, a checkpoint callback that keeps ``last`` by default, a JSONL writer
    for ``predict``, and up-front checks of checkpoint files and folders."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # No version counter: a second run into the same folder replaces last.ckpt instead of writing
        # last-v1.ckpt beside the old run's, so the path in every README and config means the newest run.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError) as error:
            # jsonargparse wraps a class's own error in union-matching noise; its message is the one to show.
            raise ConfigError(str(_innermost(error))) from error

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # A Rich progress bar unless the YAML turns bars off or brings its own.
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    # -- checks before each command ------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        # Lightning 2.6 reads the checkpoint's hyperparameters here, before any hook: check the file first.
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path is not None and ckpt_path not in CKPT_KEYWORDS:
            _check_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def _check_ckpt_path(self) -> None:
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path == "last":  # the last.ckpt Lightning will resume from, when there is one
            found = [Path(c.dirpath) / "last.ckpt" for c in self.trainer.checkpoint_callbacks if c.dirpath]
            ckpt_path = next((path for path in found if path.exists()), None)
        if ckpt_path is not None and ckpt_path not in CKPT_KEYWORDS:
            _check_checkpoint(ckpt_path)

    def before_fit(self) -> None:
        self._check_ckpt_path()
        for callback in self.trainer.checkpoint_callbacks:
            try:
                check_writable_dir(callback.dirpath or self.trainer.default_root_dir, "checkpoint.dirpath")
            except ValueError as error:
                raise ConfigError(str(error)) from None

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def before_predict(self) -> None:
        self._check_ckpt_path()
        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter(str(Path(self.trainer.default_root_dir) / "predictions.jsonl")))


CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def _check_checkpoint(path: str) -> None:
    try:
        check_checkpoint_file(path)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> TokensCLI:
    """Build (and by default run) the CLI on ``args`` (default: the command line, ``sys.argv[1:]``)."""
    return TokensCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": EXTRA_HELP},
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
    """Entry point of the ``lightning-tokens`` console script (``argv`` default: the command line)."""
    # Lightning 2.6 builds torch's deprecated LeafSpec in every fit and predict (torch 2.13 warns each time):
    # nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[words[0]](words[1:])
        return
    try:
        build_cli(argv)  # None: LightningCLI reads the command line itself (given as a list, it warns)
    except (ConfigError, DataError) as error:
        print(f"lightning-tokens: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
