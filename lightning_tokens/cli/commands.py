"""The commands of ``lightning-tokens`` beside LightningCLI's own (fit, validate, test, predict).

Each takes the words after its name and parses them itself; :func:`lightning_tokens.cli.main` dispatches to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from lightning_tokens.budget.traces import collect_main
from lightning_tokens.cli.lightning_cli import build_cli
from lightning_tokens.modeling import is_quantized
from lightning_tokens.selection.scoring import samples_of, score_dataloader


def score_main(argv: list[str]) -> None:
    """``lightning-tokens score``: score the training set of a ``fit`` YAML with the model's initial weights.

    Writes a :class:`~lightning_tokens.selection.loss_table.LossTable` for ``TokenSelection(history="precomputed")``;
    LoRA adapters are disabled while scoring::

        lightning-tokens score --config configs/sstoken/tiny.yaml --output runs/sstoken-tiny/history.pt

    Args:
        argv: ``--config FILE`` (repeatable, as for ``fit``), ``--output FILE``, optional ``--device``
            (default ``cuda`` when available, else ``cpu``) and ``--batch_size`` (default: the data module's).
    """
    parser = argparse.ArgumentParser(prog="lightning-tokens score", description=score_main.__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="the fit YAML (repeatable)")
    parser.add_argument("--output", required=True, help="where to write the history-loss file")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu; default: cuda when available")
    parser.add_argument("--batch_size", type=int, default=None, help="scoring batch size")
    args = parser.parse_args(argv)

    cli_args = [item for path in args.config for item in ("--config", path)]
    cli = build_cli(cli_args + ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"], run=False)
    module, datamodule = cli.model, cli.datamodule
    # The data module finds the model's tokenizer through the trainer, as in fit.
    cli.trainer.strategy.connect(module)
    datamodule.trainer = cli.trainer
    datamodule.setup("fit")
    if args.batch_size is not None and hasattr(datamodule, "batch_size"):
        datamodule.batch_size = args.batch_size
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not is_quantized(module):
        module.to(device)
    table = score_dataloader(getattr(module, "model", module), datamodule.train_dataloader(), device)
    samples = samples_of(datamodule)
    if samples is not None:
        table.check(samples)
    table.meta = {"config": [str(Path(p)) for p in args.config], "samples": len(table.index),
                  "tokens": int(table.flat.numel())}
    table.save(args.output)
    print(f"wrote {args.output}: {len(table.index)} samples, {table.flat.numel()} target tokens")


#: Commands beside LightningCLI's own (fit, validate, test, predict), by name.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "score": score_main,  # per-token history losses for TokenSelection(history="precomputed")
    "collect-traces": collect_main,  # a frozen model's own reasoning traces, for budget guidance
}
