"""ssToken token selection (with Rho-1, loss-only, attention-only and random baselines)."""

from lightning_tokens.selection.callback import TokenSelection
from lightning_tokens.selection.scoring import LossTable, score_main

__all__ = ["LossTable", "TokenSelection", "score_main"]
