"""ssToken token selection (with Rho-1, loss-only, attention-only and random baselines)."""

from lightning_tokens.sstoken.callback import TokenSelection
from lightning_tokens.sstoken.loss_table import LossTable
from lightning_tokens.sstoken.runaway import RunawaySelection

__all__ = ["LossTable", "RunawaySelection", "TokenSelection", "score_main"]


def __getattr__(name: str):
    # ``score_main`` (the ``lightning-tokens score`` command) moved to the CLI, which imports the library and never
    # the reverse; its old import path still works, importing the CLI only when asked for.
    if name == "score_main":
        from lightning_tokens.cli.commands import score_main

        return score_main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
