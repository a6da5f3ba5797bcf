"""The commands of ``lightning-tokens`` beside LightningCLI's own (fit, validate, test, predict).

Each takes the words after its name and parses them itself; :func:`lightning_tokens.cli.main` dispatches to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_tokens.budget.traces import collect_traces
from lightning_tokens.checkpoints import check_writable_dir
from lightning_tokens.checks import check_numbers
from lightning_tokens.cli.configs import ConfigError, configs_main
from lightning_tokens.cli.lightning_cli import build_cli
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.records import check_prompt_record, read_file
from lightning_tokens.data.tokenizer import load_task_tokenizer
from lightning_tokens.modeling import is_quantized
from lightning_tokens.sstoken.precompute import samples_of, score_dataloader


def score_main(argv: list[str]) -> None:
    """``lightning-tokens score``: score the training set of a ``fit`` YAML with the model's initial weights.

    Writes a :class:`~lightning_tokens.sstoken.loss_table.LossTable` for ``TokenSelection(history="precomputed")``;
    LoRA adapters are disabled while scoring::

        lightning-tokens score --config sstoken/tiny --output runs/sstoken-tiny/history.pt

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
    check_numbers("score", batch_size=(args.batch_size, "an integer >= 1 or None"))
    check_writable_dir(Path(args.output).parent, "--output")

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


def collect_main(argv: Optional[Sequence[str]] = None) -> None:
    """``lightning-tokens collect-traces``: a saved model's own reasoning traces, for budget guidance.

    Generates one completion per prompt with :func:`~lightning_tokens.budget.traces.collect_traces` and writes
    the records as JSONL for :class:`~lightning_tokens.budget.data.TraceDataModule`::

        lightning-tokens collect-traces --model runs/sft/export --out traces.jsonl

    Options and files are checked before the model is loaded.

    Args:
        argv: ``--model`` (hub name or folder of the frozen LM) and ``--out FILE``, required; optional
            ``--prompts FILE`` (JSONL, JSON or parquet records with a string ``prompt``; default: the embedded
            task's prompts with their answers), ``--split`` (of the embedded task, ``train`` or ``val``; default
            ``train``), ``--num N`` (the first N prompts; default all), ``--max-new-tokens`` (default 1024),
            ``--batch-size`` (default 8), ``--sample`` (default greedy decoding) and ``--temperature`` (default
            1.0). Default ``None``: the command line.
    """
    parser = argparse.ArgumentParser(prog="lightning-tokens collect-traces",
                                     description=collect_main.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub name or directory of the frozen LM")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--prompts", help="JSONL/JSON/parquet of records with 'prompt' (default: the embedded task)")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--num", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    check_numbers("collect-traces", num=(args.num, "an integer >= 1 or None"),
                  max_new_tokens=(args.max_new_tokens, "an integer >= 1"),
                  batch_size=(args.batch_size, "an integer >= 1"), temperature=(args.temperature, "> 0"))
    check_writable_dir(Path(args.out).parent, "--out")
    if args.prompts:
        prompts = [record.fields for record in read_file(args.prompts, check=check_prompt_record)]
    else:
        task = ReasoningTask(style="mixed")
        prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in task.records(args.split)]
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    except OSError as error:
        raise ConfigError(f"--model: {error}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):  # a model trained on the embedded task may be saved without its tokenizer
        tokenizer = load_task_tokenizer()
    rows = collect_traces(model, tokenizer, prompts[: args.num], args.out, args.max_new_tokens, args.batch_size,
                          args.sample, args.temperature)
    done = sum(r["finished"] for r in rows)
    print(f"wrote {len(rows)} traces to {args.out} ({len(rows) - done} without </think>)")


#: Commands beside LightningCLI's own (fit, validate, test, predict), by name.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "score": score_main,  # per-token history losses for TokenSelection(history="precomputed")
    "collect-traces": collect_main,  # a frozen model's own reasoning traces, for budget guidance
    "configs": configs_main,  # list the packaged configs, or copy one out to edit
}
