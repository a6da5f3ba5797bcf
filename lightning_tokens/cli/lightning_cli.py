"""The LightningCLI of the ``lightning-tokens`` command: fit, validate, test and predict over the project's
modules and data modules, with the checks and defaults described in :mod:`lightning_tokens.cli`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Union

from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_tokens.checkpoints import check_checkpoint_file, check_writable_dir
from lightning_tokens.cli.configs import ConfigError, resolve_config_args
from lightning_tokens.predict import PredictionWriter

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}

EXTRA_HELP = ("--config takes a file or the name of a packaged config (sft/tiny). More commands: "
              "'lightning-tokens configs' lists the packaged configs and copies one out to edit; "
              "'lightning-tokens score' writes per-token history losses for "
              "TokenSelection(history=\"precomputed\"); 'lightning-tokens collect-traces' collects a frozen "
              "model's own reasoning traces for budget guidance. Each takes --help.")


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


class TokensCLI(LightningCLI):
    """LightningCLI with a progress bar, a checkpoint callback that keeps ``last`` by default, a JSONL writer
    for ``predict``, and up-front checks of checkpoint files and folders."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # No version counter: a second run into the same folder replaces last.ckpt instead of writing
        # last-v1.ckpt beside the old run's, so the path in every README and config means the newest run.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Union[list[str], dict, Namespace, None]) -> None:
        # Every --config value may name a packaged config (sft/tiny) instead of a file.
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(resolve_config_args(sys.argv[1:] if args is None else args))

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError) as error:
            # jsonargparse wraps a class's own error in union-matching noise; its message is the one to show.
            raise ConfigError(str(_innermost(error))) from error

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # A Rich progress bar unless the YAML turns bars off or brings its own.
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    # -- checks before each command ------------------------------------------------------------------
    @override
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
            path = Path(self.trainer.default_root_dir) / "predictions.jsonl"
            self.trainer.callbacks.append(PredictionWriter(str(path)))


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
