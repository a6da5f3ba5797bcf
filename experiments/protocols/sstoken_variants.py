"""ssToken variants measured against runaway selection (issue 34), built on the package's TokenSelection.

- :class:`RefreshedHistory` / :class:`RefreshSelection`: the history is the current weights as they were at the
  last multiple of ``every`` steps (the base until then): an EMA of decay 0 that updates every ``every`` steps.
- :class:`RandomShareSelection`: ``share`` of each sample's kept budget is drawn at random from the tokens the
  score did not keep; the score keeps the rest. A loop that feeds on the score's own choice always gets back
  some of what it dropped.
"""

from __future__ import annotations

import torch

from lightning_tokens.data.packing import SampleView
from lightning_tokens.sstoken import TokenSelection
from lightning_tokens.sstoken.formulas import select_top
from lightning_tokens.sstoken.history import EmaWeights


class RefreshedHistory(EmaWeights):
    """The trainable weights copied into the history every ``every`` optimizer steps, left as they are between.

    Args:
        every: Optimizer steps between two copies.
    """

    def __init__(self, every: int) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"RefreshedHistory.every must be an integer >= 1, got {every!r}")
        super().__init__(decay=0.0)
        self.every = every
        self.steps = 0

    def after_optimizer_step(self, model) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            super().after_optimizer_step(model)  # decay 0: the averages become the current weights


class RefreshSelection(TokenSelection):
    """``TokenSelection(history="ema")`` whose history is a :class:`RefreshedHistory`.

    Args:
        every: Optimizer steps between two refreshes of the history.
        **kwargs: The other arguments of :class:`TokenSelection` (``history`` is ``"ema"``).
    """

    def __init__(self, every: int, **kwargs) -> None:
        super().__init__(history="ema", **kwargs)
        self.every = every

    def _build_source(self, model, owner):
        return RefreshedHistory(self.every)


class RandomShareSelection(TokenSelection):
    """TokenSelection keeping ``share`` of each sample's budget at random among the tokens its score dropped.

    The score keeps ``ceil(ratio * (1 - share) * n)`` tokens of a sample of ``n`` response tokens; random ones
    among the rest fill the budget up to ``ceil(ratio * n)``.

    Args:
        share: The random share of the kept budget, in ``[0, 1)``.
        **kwargs: The arguments of :class:`TokenSelection`; ``ratio`` (default ``0.6``) is the whole budget.
    """

    def __init__(self, share: float, ratio: float = 0.6, **kwargs) -> None:
        if not 0 <= share < 1:
            raise ValueError(f"RandomShareSelection.share must be in [0, 1), got {share!r}")
        super().__init__(ratio=ratio * (1 - share), **kwargs)
        self.share, self.budget = share, ratio
        self.generator = torch.Generator().manual_seed(self.seed)

    def reshape_token_loss(self, ctx) -> None:
        super().reshape_token_loss(ctx)
        samples = SampleView(ctx.target_mask, ctx.target_segments)
        response = samples.response
        kept = samples.expand(ctx.weights > 0) & response
        scored = select_top(torch.zeros(response.shape), response.cpu(), self.budget).sum(dim=1)  # ceil(budget n)
        missing = (scored - kept.sum(dim=1).cpu()).clamp_min(0)
        draw = torch.rand(response.shape, generator=self.generator).masked_fill(~(response & ~kept).cpu(), -1.0)
        ranks = draw.argsort(dim=1, descending=True).argsort(dim=1)
        added = (ranks < missing[:, None]) & (draw >= 0)
        add = samples.collapse(added.to(ctx.target_mask.device))
        ctx.weights = torch.where(add, ctx.target_mask.float(), ctx.weights)
