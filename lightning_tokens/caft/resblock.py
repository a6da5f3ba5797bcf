"""Resblock heads: Medusa's residual block ``x + SiLU(W x + b)`` per head, with ``W`` zero-initialised."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor, nn

from lightning_tokens.caft.trunk import Trunk
from lightning_tokens.caft.variant import HeadVariant

if TYPE_CHECKING:
    from lightning_tokens.caft.heads import MultiTokenHeads


class ResBlock(nn.Module):
    """Medusa's residual block ``x + SiLU(W x + b)``; ``W`` starts at zero, so the block starts as the identity.

    Args:
        hidden_size: Width of ``x`` (the model's hidden size). No default.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.linear(x))


class ResBlockVariant(HeadVariant):
    """Heads that are one :class:`ResBlock` each (reference code: ``head_arch="linear"``); they read one position
    at a time, so they need no mask and no cache."""

    name = "resblock"

    def build(self, base: nn.Module, num_heads: int, init_from_model: bool) -> tuple[nn.ModuleList, None]:
        hidden_size = base.get_output_embeddings().weight.shape[-1]
        return nn.ModuleList(ResBlock(hidden_size) for _ in range(num_heads)), None

    def head_states(self, heads: MultiTokenHeads, k: int, trunk: Trunk, attention_mask: Optional[Tensor],
                    cache: Any, past_length: int, segments: Optional[Tensor],
                    additive_mask: Optional[Tensor]) -> Tensor:
        block = heads.blocks[k - 1]
        return block(trunk.hidden.to(next(block.parameters()).dtype))
