"""Where to think: every position (the paper), or the positions whose next token the model finds hardest.

The paper samples a thought after every token. Its analysis finds that thoughts help most on the difficult
tokens, and a thought costs ``thought_length + n_ahead_talk + 1`` passes wherever it is sampled. With
``think_at`` a number ``k`` (an ``int``) or a share ``s`` (a ``float``), each row thinks only at its ``k`` (or
``ceil(s * candidates)``) candidate positions with the highest entropy of the base model's next-token
distribution (the thought-free text pass, the delimiters masked out); the thought and talk passes then run on
those positions alone, so their cost scales with the number chosen. A candidate is a real position from which
some talk step has a target of its own sample: a thought anywhere else could not change the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor

from lightning_tokens.lean_loss import IGNORE_INDEX

#: ``"all"``, a number of positions per row (``int >= 1``) or a share of each row's candidates (``0 < float <= 1``).
ThinkAt = Union[Literal["all"], int, float]


def check_think_at(value: ThinkAt, where: str = "think_at") -> ThinkAt:
    """``value`` if it is a valid ``think_at``, else one ``ValueError`` naming ``where``."""
    if value == "all" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be 'all', a number of positions (int >= 1) or a share (0 < float <= 1), "
                         f"got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{where}: a number of positions must be at least 1, got {value}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"{where}: a share of positions must be in (0, 1], got {value}")
    return value


@dataclass
class ThoughtPositions:
    """The positions each row thinks at.

    Attributes:
        index: ``(B, P)`` position of each thought slot, ascending within a row (``P`` = the most any row thinks
            at; a row with fewer fills its last slots with a repeat, marked in ``valid``).
        valid: ``(B, P)`` bool: the slot holds a chosen position.
    """

    index: Tensor
    valid: Tensor

    def take(self, values: Tensor, shift: int = 0, fill: float | int = 0) -> Tensor:
        """``values[b, index[b, p] + shift]`` for ``values`` of shape ``(B, L, ...)``: ``(B, P, ...)``, ``fill``
        where ``index + shift`` runs past the end."""
        length = values.shape[1]
        index = self.index + shift
        inside = index < length
        index = index.clamp_max(length - 1)
        expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
        taken = values.gather(1, expanded)
        outside = ~inside.view(*inside.shape, *([1] * (values.dim() - 2)))
        return taken.masked_fill(outside, fill)

    def scatter(self, values: Tensor, length: int, fill: float = 0.0) -> Tensor:
        """``(B, P)`` slot values written back to ``(B, length)`` positions (``fill`` elsewhere and at invalid
        slots)."""
        out = values.new_full((values.shape[0], length + 1), fill)  # the last column takes the empty slots
        return out.scatter(1, self.index.masked_fill(~self.valid, length), values)[:, :length]


def thought_candidates(targets: Tensor, n_ahead_talk: int, segments: Optional[Tensor] = None) -> Tensor:
    """``(B, L)`` bool: positions ``i`` from which some talk step ``s < n_ahead_talk`` has a target
    (``targets[i + s] != -100``) in ``i``'s own sample (``segments`` numbers the samples of packed rows)."""
    valid = targets != IGNORE_INDEX
    length = targets.shape[1]
    candidates = torch.zeros_like(valid)
    for shift in range(min(n_ahead_talk, length)):
        reach = torch.nn.functional.pad(valid[:, shift:], (0, shift), value=False)
        if segments is not None:
            reach &= torch.nn.functional.pad(segments[:, shift:] == segments[:, : length - shift], (0, shift),
                                             value=False)
        candidates |= reach
    return candidates


@torch.no_grad()
def next_token_entropy(head: Callable[[Tensor], Tensor], hidden: Tensor, forbidden_ids: Tensor,
                       chunk: int = 1024) -> Tensor:
    """``(B, L)`` float32 entropy of ``softmax(head(hidden))`` with ``forbidden_ids`` masked out, computed ``chunk``
    positions at a time (no ``(B, L, V)`` logits held at once); ``head`` maps hidden states to logits (the model's
    :class:`~lightning_tokens.lean_loss.OutputProjection`)."""
    flat = hidden.flatten(0, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, flat.shape[0], chunk):
        logits = head(flat[start:start + chunk]).float().index_fill(-1, forbidden_ids, float("-inf"))
        log_p = logits.log_softmax(-1)
        out[start:start + chunk] = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
    return out.view(hidden.shape[:2])


def choose_positions(entropy: Tensor, candidates: Tensor, think_at: ThinkAt) -> Optional[ThoughtPositions]:
    """The positions each row thinks at: ``None`` for ``"all"``; else the candidates of highest ``entropy``,
    ``think_at`` of them (``int``) or ``ceil(think_at * candidates)`` (``float``) per row."""
    if think_at == "all":
        return None
    available = candidates.sum(-1)
    if isinstance(think_at, int):
        wanted = available.clamp_max(think_at)
    else:
        # rounded first: 0.07 * 100 is 7.000000000000001 in floats, whose ceiling would be 8
        wanted = torch.round(available.double() * think_at, decimals=9).ceil().long()
    slots = max(int(wanted.max()), 1)
    ranked = entropy.float().masked_fill(~candidates, float("-inf")).topk(slots, dim=-1).indices
    valid = torch.arange(slots, device=entropy.device)[None] < wanted[:, None]
    length = entropy.shape[-1]
    ordered = torch.where(valid, ranked, length).sort(-1).values  # chosen positions ascending, then the empty slots
    filler = ordered[:, :1].clamp_max(length - 1)  # a row's first chosen position (or 0): never read as a thought
    return ThoughtPositions(torch.where(ordered < length, ordered, filler), valid)
