"""Per-head cross-entropy without ever building ``(K + 1, B, T, V)`` logits.

Head ``k`` at position ``t`` is scored against ``labels[t + 1 + k]``. Only positions that are real tokens, with
a real target not labelled ``-100``, are projected onto the vocabulary, ``chunk_size`` rows at a time; under
autograd each chunk runs inside activation checkpointing, so its ``(chunk, V)`` logits are freed at once and
recomputed in backward.
Peak extra memory is one chunk of logits instead of ``K * B * T * V``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_tokens.heads.heads import MultiTokenHeads, Trunk

IGNORE_INDEX = -100


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


def _chunk_ce(project: Callable[[Tensor], Tensor], states: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = project(states).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, correct


def chunked_cross_entropy(project: Callable[[Tensor], Tensor], states: Tensor, targets: Tensor,
                          chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and top-1 hits of ``project(states)`` against ``targets``, ``chunk_size`` rows at a time.

    Args:
        project: Maps ``(N, D)`` states to ``(N, V)`` logits.
        states: ``(N, D)`` states at target positions.
        targets: ``(N,)`` target ids.
        chunk_size: Rows projected at once. Default ``1024``.
    """
    total = states.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=states.device)
    use_checkpoint = torch.is_grad_enabled() and states.requires_grad
    for start in range(0, states.shape[0], chunk_size):
        piece, goal = states[start:start + chunk_size], targets[start:start + chunk_size]
        if use_checkpoint:
            loss, hits = checkpoint(_chunk_ce, project, piece, goal, use_reentrant=False)
        else:
            loss, hits = _chunk_ce(project, piece, goal)
        total = total + loss
        correct = correct + hits
    return total, correct


def head_losses(heads: MultiTokenHeads, model: nn.Module, trunk: Trunk, labels: Tensor,
                attention_mask: Optional[Tensor] = None, chunk_size: int = 1024) -> list[HeadLoss]:
    """``CE_k`` of every head ``k = 1..K`` against ``labels`` shifted by ``1 + k``.

    Args:
        heads: The heads.
        model: The causal LM they belong to (final norm and ``lm_head``).
        trunk: Its trunk on the batch.
        labels: ``(B, T)`` labels as given to the model (unshifted, ``-100`` where not a target).
        attention_mask: ``(B, T)`` padding mask, or ``None``.
        chunk_size: Rows projected onto the vocabulary at once. Default ``1024``.

    Returns:
        One :class:`HeadLoss` per head, in order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    length = labels.shape[1]
    results = []
    for k in range(1, heads.num_heads + 1):
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
        count = valid.sum()
        states = heads.head_states(k, trunk, attention_mask)[:, : length - shift][valid]
        total, correct = chunked_cross_entropy(lambda x, k=k: heads.project(model, k, x), states, targets[valid],
                                               chunk_size)
        results.append(HeadLoss(total / count.clamp_min(1), correct, count))
    return results


def weighted_sum(losses: list[HeadLoss], gamma: float) -> Tensor:
    """``sum_k gamma^k CE_k`` (k from 1)."""
    return sum(gamma ** k * item.loss for k, item in enumerate(losses, start=1))
