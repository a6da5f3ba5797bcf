"""The history-loss file: per-token losses of a training set, keyed by sample content.

:class:`LossTable` is what ``lightning-tokens score`` writes (with
:func:`~lightning_tokens.sstoken.precompute.score_dataloader`) and what
:class:`~lightning_tokens.sstoken.TokenSelection` (``history="precomputed"``) reads. Each sample is keyed by a
hash of its token ids and labels (:func:`sample_key`), not by its index, so shuffling, DDP sharding and batch
composition do not matter, and a file made for other data (other tokenizer, template, ``max_length``) is detected.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_tokens.files import atomic_path
from lightning_tokens.lean_loss import IGNORE_INDEX

FORMAT = "lightning-tokens/history-losses/v1"


def sample_key(input_ids: Iterable[int], labels: Iterable[int]) -> str:
    """The hash identifying one sample: its real token ids and which of them are targets."""
    ids = np.asarray(input_ids, dtype=np.int64)
    targets = np.asarray(labels, dtype=np.int64) != IGNORE_INDEX
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
        self.flat = torch.cat([loss.float().flatten() for loss in losses]) if losses else torch.zeros(0)
        self.index: dict[str, tuple[int, int]] = {}
        offset = 0
        for key, loss in zip(keys, losses):
            self.index[key] = (offset, loss.numel())
            offset += loss.numel()

    def save(self, path: str | Path) -> None:
        """Write the table atomically (a partly written file never has the final name)."""
        keys = list(self.index)
        payload = {"format": FORMAT, "meta": self.meta, "keys": keys,
                   "offsets": torch.tensor([self.index[k][0] for k in keys], dtype=torch.long),
                   "lengths": torch.tensor([self.index[k][1] for k in keys], dtype=torch.long), "losses": self.flat}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

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
            elif entry[1] != sum(1 for label in labels[1:] if label != IGNORE_INDEX):
                wrong += 1
        if missing or wrong:
            raise ValueError(f"TokenSelection.history_file: {self.path} does not match the training data: "
                             f"{missing} of {total} samples missing, {wrong} with another number of target tokens "
                             "(was it scored with another dataset, tokenizer, template or max_length?)")

    def lookup(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
               segments: Optional[Tensor] = None) -> Tensor:
        """``(B, T - 1)`` history losses of a padded or packed (``segments`` given) batch, 0 off the targets."""
        targets = (labels[:, 1:] != IGNORE_INDEX).cpu()
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
