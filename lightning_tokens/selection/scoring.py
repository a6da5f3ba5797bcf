"""``lightning-tokens score``: write the history model's per-token losses of a training set to a file.

The file lets :class:`~lightning_tokens.selection.TokenSelection` (``history="precomputed"``) train without
a second model in memory or a second forward, as in the ssToken reference code. Unlike a file keyed by sample
index, each sample is keyed by a hash of its token ids and labels, so shuffling, DDP sharding and batch
composition do not matter, and a file made for other data (other tokenizer, template, ``max_length``) is
detected: the training set is checked against it when training starts, and every batch row when it is
looked up.

Usage (same YAML as ``fit``; the model's initial weights are the history model; LoRA adapters are disabled)::

    lightning-tokens score --config configs/sstoken/tiny.yaml --output runs/sstoken-tiny/history.pt
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor

FORMAT = "lightning-tokens/history-losses/v1"


def sample_key(input_ids: Iterable[int], labels: Iterable[int]) -> str:
    """The hash identifying one sample: its real token ids and which of them are targets."""
    ids = np.asarray(input_ids, dtype=np.int64)
    targets = np.asarray(labels, dtype=np.int64) != -100
    return hashlib.blake2b(ids.tobytes() + targets.tobytes(), digest_size=16).hexdigest()


def row_keys(input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
             segments: Optional[Tensor] = None) -> list[tuple[int, str, np.ndarray]]:
    """``(row, sample_key, positions)`` of every sample of a batch, padding removed, in row-major order, with
    the ``(T,)`` bool positions of the sample in its row; a packed row (``segments``: the sample number of each
    token) gives one entry per sample."""
    if segments is None:
        segments = torch.zeros_like(input_ids)
    rows = torch.stack([input_ids, labels, attention_mask.long(), segments]).cpu().numpy()  # one device-to-host copy
    keys = []
    for row, (ids, lab, mask, seg) in enumerate(zip(*rows)):
        real = mask.astype(bool)
        for number in np.unique(seg[real]):
            part = real & (seg == number)
            keys.append((row, sample_key(ids[part], lab[part]), part))
    return keys


class LossTable:
    """Per-token history losses of a set of samples: each key's target-token losses, in position order.

    Args:
        keys: Sample keys.
        losses: For each key, a 1-d float tensor of its target tokens' losses.
        meta: Free-form description (model, data) stored with the table. Default ``None``.
        path: Where it was loaded from, for messages. Default ``None``.
    """

    def __init__(self, keys: list[str], losses: list[Tensor], meta: Optional[dict] = None,
                 path: Optional[str] = None) -> None:
        self.meta = meta or {}
        self.path = path or "<memory>"
        self.flat = torch.cat([l.float().flatten() for l in losses]) if losses else torch.zeros(0)
        self.index: dict[str, tuple[int, int]] = {}
        offset = 0
        for key, loss in zip(keys, losses):
            self.index[key] = (offset, loss.numel())
            offset += loss.numel()

    def save(self, path: str | Path) -> None:
        """Write the table atomically (a partly written file never has the final name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.index)
        payload = {"format": FORMAT, "meta": self.meta, "keys": keys,
                   "offsets": torch.tensor([self.index[k][0] for k in keys], dtype=torch.long),
                   "lengths": torch.tensor([self.index[k][1] for k in keys], dtype=torch.long), "losses": self.flat}
        tmp = path.with_name(path.name + ".partial")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "LossTable":
        """Read a table written by :meth:`save`; one clear error for a missing or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TokenSelection.history_file: {path} does not exist; write it with "
                                    "`lightning-tokens score --config <fit yaml> --output <file>`")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"TokenSelection.history_file: {path} is not a history-loss file ({FORMAT})")
        table = cls([], [], payload["meta"], str(path))
        table.flat = payload["losses"]
        table.index = {k: (int(o), int(n)) for k, o, n in zip(payload["keys"], payload["offsets"], payload["lengths"])}
        return table

    def check(self, samples: Iterable[tuple[list[int], list[int]]]) -> None:
        """Raise unless every ``(input_ids, labels)`` sample is in the table with as many target tokens."""
        missing = wrong = total = 0
        for ids, labels in samples:
            total += 1
            entry = self.index.get(sample_key(ids, labels))
            if entry is None:
                missing += 1
            elif entry[1] != sum(1 for label in labels[1:] if label != -100):
                wrong += 1
        if missing or wrong:
            raise ValueError(f"TokenSelection.history_file: {self.path} does not match the training data: "
                             f"{missing} of {total} samples missing, {wrong} with another number of target tokens "
                             "(was it scored with another dataset, tokenizer, template or max_length?)")

    def lookup(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
               segments: Optional[Tensor] = None) -> Tensor:
        """``(B, T - 1)`` history losses of a padded or packed (``segments`` given) batch, 0 off the targets."""
        targets = (labels[:, 1:] != -100).cpu()
        pieces = []
        for row, key, part in row_keys(input_ids, attention_mask, labels, segments):
            entry = self.index.get(key)
            if entry is None:
                raise ValueError(f"TokenSelection.history_file: {self.path} has no losses for training sample "
                                 f"{input_ids[row].cpu()[torch.from_numpy(part)][:12].tolist()}... "
                                 "(was it scored with another dataset, tokenizer, template or max_length?)")
            pieces.append(self.flat[entry[0]:entry[0] + entry[1]])
        out = torch.zeros(targets.shape, dtype=torch.float32)
        flat = torch.cat(pieces)
        if flat.numel() != int(targets.sum()):
            raise ValueError(f"TokenSelection.history_file: {self.path} holds another number of target tokens for "
                             "a sample of this batch (was it scored with another dataset, tokenizer, template or "
                             "max_length?)")
        out[targets] = flat  # row-major order: each row's samples, and their targets, in position order
        return out


def samples_of(datamodule: Any) -> Optional[list[tuple[list[int], list[int]]]]:
    """``(input_ids, labels)`` of every training sample of an :class:`SFTDataModule`-like data module, else None."""
    dataset = getattr(datamodule, "train_dataset", None)
    samples = getattr(dataset, "samples", None)
    if samples is None or not all(hasattr(s, "input_ids") and hasattr(s, "labels") for s in samples[:1]):
        return None
    return [(s.input_ids, s.labels) for s in samples]


@torch.no_grad()
def score_dataloader(model: torch.nn.Module, batches: Iterable[dict], device: torch.device) -> LossTable:
    """History losses of every sample in ``batches`` under ``model`` (eval mode, adapters disabled)."""
    from lightning_tokens.data.packing import batch_samples, model_inputs
    from lightning_tokens.modeling import causal_lm_of
    from lightning_tokens.selection.history import TokenNll, eval_mode

    nll = TokenNll()
    lm = causal_lm_of(model)
    disable = getattr(model, "disable_adapter", None)
    keys: list[str] = []
    losses: list[Tensor] = []
    seen: set[str] = set()
    for batch in batches:
        inputs = {key: value.to(device) if isinstance(value, Tensor) else value
                  for key, value in model_inputs(batch, labels=False).items()}
        ids, labels = inputs["input_ids"], batch["labels"].to(device)
        mask, segments = (tensor.to(device) if tensor is not None else None for tensor in batch_samples(batch))
        with (disable() if disable is not None else contextlib.nullcontext()), eval_mode(lm):
            loss = nll(lm, inputs, labels).cpu()
        targets = (labels[:, 1:] != -100).cpu()
        for row, key, part in row_keys(ids, mask, labels, segments):
            if key not in seen:
                seen.add(key)
                keys.append(key)
                losses.append(loss[row][targets[row] & torch.from_numpy(part[1:])].clone())
    return LossTable(keys, losses)


def score_main(argv: list[str]) -> None:
    """``lightning-tokens score``: score the training set of a ``fit`` YAML with the model's initial weights.

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

    from lightning_tokens.cli import build_cli

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
    from lightning_tokens.modeling import is_quantized

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
