"""Quiet-STaR: thought tokens learned from plain text, and generation that thinks before every token.

- :class:`QuietSTaRModule`: the LightningModule (continued pretraining with thoughts).
- :func:`parallel_thoughts`: every position's (or the ``think_at`` positions') thoughts in one pass per token,
  attending to the text's keys held once and to their own window (:mod:`.attention`).
- :func:`quiet_star_loss`: the paper's NLL + REINFORCE loss.
- :func:`thoughtful_generate`: think on a KV cache allocated once, mix, emit; the next token overwrites the thought.
"""

from lightning_tokens.quiet_star.generate import ThoughtfulOutput, thoughtful_generate
from lightning_tokens.quiet_star.loss import QuietSTaRLoss, next_token_targets, quiet_star_loss
from lightning_tokens.quiet_star.mixing import MixingHead, ThoughtEmbeddings
from lightning_tokens.quiet_star.module import QuietSTaRModule
from lightning_tokens.quiet_star.parallel import ThoughtPasses, parallel_thoughts

__all__ = [
    "MixingHead",
    "QuietSTaRLoss",
    "QuietSTaRModule",
    "ThoughtEmbeddings",
    "ThoughtPasses",
    "ThoughtfulOutput",
    "next_token_targets",
    "parallel_thoughts",
    "quiet_star_loss",
    "thoughtful_generate",
]
