"""Per-head cross-entropy without ever building ``(K + 1, B, T, V)`` logits.

Head ``k`` at position ``t`` is scored against ``labels[t + 1 + k]``. Only positions that are real tokens, with
a real target not labelled ``-100``, are projected onto the vocabulary, ``chunk_size`` rows at a time, by the
same helper as the main loss (:func:`lightning_tokens.lean_loss.chunked_cross_entropy`): peak extra memory is
one chunk of logits instead of ``K * B * T * V``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_tokens.caft.heads import MultiTokenHeads, Trunk
from lightning_tokens.lean_loss import DEFAULT_CHUNK, IGNORE_INDEX, OutputProjection, chunked_cross_entropy


@dataclass
class HeadLoss:
    """One head's result on a batch.

    Attributes:
        loss: Mean cross-entropy over the head's targets (``CE_k``), float32; 0 when it has none.
        correct: Number of targets whose top-1 prediction is right.
        count: Number of targets.
    """

    loss: Tensor
    correct: Tensor
    count: Tensor

    @property
    def accuracy(self) -> Tensor:
        return self.correct.float() / self.count.clamp_min(1).float()


def head_losses(heads: MultiTokenHeads, model: nn.Module, trunk: Trunk, labels: Tensor,
                attention_mask: Optional[Tensor] = None, chunk_size: int = DEFAULT_CHUNK,
                segments: Optional[Tensor] = None) -> list[HeadLoss]:
    """``CE_k`` of every head ``k = 1..K`` against ``labels`` shifted by ``1 + k``.

    Args:
        heads: The heads.
        model: The causal LM they belong to (final norm and ``lm_head``).
        trunk: Its trunk on the batch.
        labels: ``(B, T)`` labels as given to the model (unshifted, ``-100`` where not a target).
        attention_mask: ``(B, T)`` padding mask, or ``None``.
        chunk_size: Rows projected onto the vocabulary at once. Default ``1024``.
        segments: ``(B, T)`` sample number of each token of a packed batch, or ``None``: a head then never
            predicts a token of another sample, and its layer attends within the sample. Default ``None``.

    Returns:
        One :class:`HeadLoss` per head, in order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    length = labels.shape[1]
    results = []
    for k, states in enumerate(heads.all_head_states(model, trunk, attention_mask, segments), start=1):
        shift = 1 + k
        if length <= shift:
            zero = trunk.hidden.new_zeros((), dtype=torch.float32)
            results.append(HeadLoss(zero, torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)))
            continue
        targets = labels[:, shift:]
        valid = targets != IGNORE_INDEX
        if attention_mask is not None:
            # Both ends must be real tokens: a padding position's hidden state is not a prediction (under left
            # padding and eager attention it even depends on later tokens), and a padding target is none.
            real = attention_mask.bool()
            valid = valid & real[:, : length - shift] & real[:, shift:]
        if segments is not None:
            valid = valid & (segments[:, : length - shift] == segments[:, shift:])
        count = valid.sum()
        states = states[:, : length - shift][valid]
        rows = heads.normed(model, k, states)
        # CE_k is a plain mean, so each row's weight is known now: the fused path finishes its gradients in forward.
        scale = torch.ones(rows.shape[0], device=rows.device) / count.clamp_min(1)
        projection = OutputProjection(model, heads.unembedding(model, k))
        loss, hits = chunked_cross_entropy(projection, rows, targets[valid], chunk_size, scale=scale)
        results.append(HeadLoss(loss, hits.sum(), count))
    return results


def weighted_sum(losses: list[HeadLoss], gamma: float) -> Tensor:
    """``sum_k gamma^k CE_k`` (k from 1)."""
    return sum(gamma ** k * item.loss for k, item in enumerate(losses, start=1))
