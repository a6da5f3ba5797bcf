"""Drafting with MTP depths inside :func:`~lightning_tokens.caft.speculative.generate_with_heads`.

Depth ``k`` at position ``p`` reads the token at ``p + k``. After a round, a row's tokens are final up to its next
token ``P + 1`` (``P``: its last verified position), so depth ``k``'s state at ``p`` is final once
``p + k <= P + 1``; at the later positions it reads this round's own drafts. The depths share one KV cache (depth
``k`` at layer ``k - 1``) laid out on the model's cache slots, with the same slot mask. Each round it is cut
back to the slots that are final for every depth and row, and the depths run over the slots after them: the
round's new slots and, for ``K`` drafts, up to ``K - 1`` earlier positions per row. With one draft nothing is
recomputed.

Each depth is run by the heads' own :class:`~lightning_tokens.caft.mtp.MtpVariant`, which builds this drafter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from lightning_tokens.caft.trunk import Trunk, causal_additive_mask

if TYPE_CHECKING:
    from lightning_tokens.caft.heads import MultiTokenHeads


class MtpDrafter:
    """Proposes ``num_draft`` tokens per row from the chained MTP depths, over a batch of left-padded prompts.

    Args:
        heads: MTP heads.
        model: Their causal LM.
        num_draft: Depths to run (drafts per round).
        prompt_ids: ``(B, T)`` left-padded prompts.
        prompt_mask: ``(B, T)`` their mask.
        max_new_tokens: Most tokens a row generates.
    """

    def __init__(self, heads: MultiTokenHeads, model: nn.Module, num_draft: int, prompt_ids: Tensor,
                 prompt_mask: Tensor, max_new_tokens: int) -> None:
        self.heads, self.model, self.num_draft = heads, model, num_draft
        self.projectors = [heads.projector(model, k) for k in range(1, num_draft + 1)]
        self.cache = DynamicCache()
        batch, device = prompt_ids.shape[0], prompt_ids.device
        self.prompt_lengths = prompt_mask.sum(1)
        # tokens[b, p]: row b's token at position p (prompt, then generated, then this round's drafts)
        self.tokens = torch.zeros(batch, prompt_ids.shape[1] + max_new_tokens + num_draft + 2, dtype=prompt_ids.dtype,
                                  device=device)
        for b in range(batch):
            self.tokens[b, : int(self.prompt_lengths[b])] = prompt_ids[b][prompt_mask[b].bool()]
        self.written = [0] * batch
        self.done = 0  # slots final for every depth and row, kept in the cache
        self.hidden: Optional[Tensor] = None  # main final hidden states of the slots from `done` on
        self.positions = prompt_ids.new_zeros(batch, 0)

    def advance(self, trunk: Trunk, slot_mask: Tensor, last: Tensor, positions: Tensor, generated: list[list[int]],
                finished: list[bool]) -> Tensor:
        """``(B, K)`` drafts after slot ``last[b]`` of the new slots.

        Args:
            trunk: Final hidden states of the new slots.
            slot_mask: ``(B, S)`` mask of every slot so far.
            last: ``(B,)`` each row's last verified slot among the new ones.
            positions: ``(B, n)`` position ids of the new slots.
            generated: Each row's generated tokens (the last one is its next, unverified-by-input token).
            finished: Rows that stopped.
        """
        batch, device = positions.shape[0], positions.device
        for b, row in enumerate(generated):
            new = row[self.written[b]:]
            start = int(self.prompt_lengths[b]) + self.written[b]
            self.tokens[b, start: start + len(new)] = torch.tensor(new, dtype=self.tokens.dtype, device=device)
            self.written[b] = len(row)
        hidden = trunk.hidden if self.hidden is None else torch.cat([self.hidden, trunk.hidden], 1)
        window_positions = torch.cat([self.positions, positions], 1)
        width = hidden.shape[1]
        stale = self.cache.get_seq_length() - self.done
        if stale > 0:
            self.cache.crop(-stale)  # a negative count removes that many slots (transformers 4.x and 5.x)
        mask = causal_additive_mask(slot_mask, width, self.done, self.heads.weight_dtype, device, batch)
        rows = torch.arange(batch, device=device)
        frontier = width - positions.shape[1] + last
        verified = window_positions[rows, frontier]  # P: each row's last verified position
        limit = self.tokens.shape[1] - 1
        drafts, previous = [], hidden
        for k in range(1, self.num_draft + 1):
            ahead = (window_positions + k).clamp(0, limit)
            previous = self.heads.variant.depth_states(self.heads, self.model, k, previous,
                                                       self.tokens.gather(1, ahead), ahead, mask, self.cache)
            draft = self.projectors[k - 1](previous[rows, frontier]).argmax(-1)
            self.tokens[rows, (verified + 1 + k).clamp(max=limit)] = draft.to(self.tokens.dtype)
            drafts.append(draft)
        # slots final for every depth: masked ones, those of finished rows, and positions p with p + K <= P + 1
        final = ~slot_mask[:, self.done:].bool() | (window_positions + self.num_draft <= verified[:, None] + 1)
        final = final | torch.tensor(finished, device=device)[:, None]
        kept = int(final.all(0).long().cumprod(0).sum())
        self.done += kept
        self.hidden, self.positions = hidden[:, kept:], window_positions[:, kept:]
        return torch.stack(drafts, 1)
