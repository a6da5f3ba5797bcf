"""Score a training set with the history model: the per-token losses ``lightning-tokens score`` writes.

The file (a :class:`~lightning_tokens.sstoken.loss_table.LossTable`) lets
:class:`~lightning_tokens.sstoken.TokenSelection` (``history="precomputed"``) train without a second model in
memory or a second forward, as in the ssToken reference code. The training set is checked against it when training
starts, and every batch row when it is looked up. The command itself is
:func:`lightning_tokens.cli.commands.score_main`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from lightning_tokens.data.packing import batch_samples, model_inputs
from lightning_tokens.lean_loss import IGNORE_INDEX
from lightning_tokens.modeling import causal_lm_of, peft_model_of
from lightning_tokens.sstoken.history import TokenNll, eval_mode
from lightning_tokens.sstoken.loss_table import FORMAT, LossTable, row_keys, sample_key

# The file format lived here in 0.1 (as ``selection/scoring.py``): importing ``LossTable`` from here keeps working.
__all__ = ["FORMAT", "LossTable", "row_keys", "sample_key", "samples_of", "score_dataloader"]


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
    nll = TokenNll()
    lm = causal_lm_of(model)
    peft = peft_model_of(model)
    keys: list[str] = []
    losses: list[Tensor] = []
    seen: set[str] = set()
    for batch in batches:
        inputs = {key: value.to(device) if isinstance(value, Tensor) else value
                  for key, value in model_inputs(batch, labels=False).items()}
        ids, labels = inputs["input_ids"], batch["labels"].to(device)
        mask, segments = (tensor.to(device) if tensor is not None else None for tensor in batch_samples(batch))
        with (peft.disable_adapter() if peft is not None else contextlib.nullcontext()), eval_mode(lm):
            loss = nll(lm, inputs, labels).cpu()
        targets = (labels[:, 1:] != IGNORE_INDEX).cpu()
        for row, key, part in row_keys(ids, mask, labels, segments):
            if key not in seen:
                seen.add(key)
                keys.append(key)
                losses.append(loss[row][targets[row] & torch.from_numpy(part[1:])].clone())
    return LossTable(keys, losses)
