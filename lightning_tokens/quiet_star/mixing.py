"""The two trainable pieces Quiet-STaR adds to a causal LM: thought-delimiter embeddings and the mixing head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ThoughtEmbeddings(nn.Module):
    """Input embeddings of the start-of-thought and end-of-thought tokens, trained at a scaled rate.

    The parameter holds ``embedding / scale`` and the forward multiplies by ``scale``: under Adam, whose
    steps do not depend on the gradient's size, the embeddings then move ``scale`` times faster than the
    other weights (the paper's x100 learning rate for these two tokens).

    Args:
        initial: ``(d,)`` starting embedding of both tokens (the paper: the embedding of ``"---"``).
        scale: Learning-rate multiplier of the two embeddings (reference ``embedding_scale``). Default ``100.0``.
    """

    def __init__(self, initial: Tensor, scale: float = 100.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"ThoughtEmbeddings.scale must be positive, got {scale}")
        self.scale = float(scale)
        self.scaled = nn.Parameter(initial.detach().float().clone().repeat(2, 1) / self.scale)

    @property
    def start(self) -> Tensor:
        """``(d,)`` the start-of-thought embedding."""
        return self.scaled[0] * self.scale

    @property
    def end(self) -> Tensor:
        """``(d,)`` the end-of-thought embedding."""
        return self.scaled[1] * self.scale

    def forward(self) -> Tensor:
        """``(2, d)`` both embeddings (start, end)."""
        return self.scaled * self.scale


class MixingHead(nn.Module):
    """Weight of the post-thought prediction: ``w = MLP([h_base ; h_thought])``.

    ``Linear(2d, d) -> ReLU -> Linear(d, d) -> ReLU -> Linear(d, 1, bias=False)``, the last layer zero,
    so ``w = 0`` and the mixed prediction is the base model's until training moves it. The mixed hidden
    state is ``(1 - w) * h_base + w * h_thought``; mixing the final hidden states before the (linear)
    output layer equals mixing the logits, and needs one vocabulary projection instead of two (under Gemma's
    final logit soft cap, not linear, the mixed state's logits are capped as the model caps its own).

    Args:
        hidden_size: The model's hidden size ``d``.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, 1, bias=False),
        )
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, base: Tensor, thought: Tensor) -> tuple[Tensor, Tensor]:
        """The mixed hidden states and the weights ``(..., 1)``, from base and post-thought states ``(..., d)``."""
        weight = self.net(torch.cat([base, thought], dim=-1).to(self.net[0].weight.dtype)).to(base.dtype)
        return base + weight * (thought - base), weight
