"""Drafting with independent heads (layer and resblock) inside
:func:`~lightning_tokens.caft.speculative.generate_with_heads`.

Each head reads the trunk at the cache's new slots; heads that attend (layer heads) keep their own small KV caches
with the same slots and slot mask as the model's, heads that do not (resblock heads) need none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from lightning_tokens.caft.trunk import Trunk, causal_additive_mask

if TYPE_CHECKING:
    from lightning_tokens.caft.heads import MultiTokenHeads


class HeadDrafter:
    """Runs the heads incrementally over the cache's slots and proposes K draft tokens per row.

    Args:
        heads: Layer or resblock heads.
        model: Their causal LM.
        num_draft: Heads to run (drafts per round).
    """

    def __init__(self, heads: MultiTokenHeads, model: nn.Module, num_draft: int) -> None:
        self.heads, self.model, self.num_draft = heads, model, num_draft
        self.attends = heads.variant.attends
        self.caches = [DynamicCache() if self.attends else None for _ in range(num_draft)]
        self.projectors = [heads.projector(model, k) for k in range(1, num_draft + 1)]
        self.length = 0

    def advance(self, trunk: Trunk, slot_mask: Tensor, last: Tensor, *unused) -> Tensor:
        """``(B, K)`` drafts after slot ``last[b]`` of the new ``trunk`` positions; ``slot_mask`` covers all slots."""
        batch, width = trunk.hidden.shape[:2]
        rows = torch.arange(batch, device=last.device)
        mask = None
        if self.attends:  # the same for every head: built once per round
            mask = causal_additive_mask(slot_mask, width, self.length, self.heads.weight_dtype, last.device, batch)
        drafts = []
        for k in range(1, self.num_draft + 1):  # heads past num_draft are never run
            states = self.heads.head_states(k, trunk, slot_mask, self.caches[k - 1], self.length, additive_mask=mask)
            drafts.append(self.projectors[k - 1](states[rows, last]).argmax(-1))
        self.length += width
        return torch.stack(drafts, 1)
