"""Budget guidance (arXiv 2506.13752): steer a reasoning model's thinking length with a remaining-length predictor.

1. Collect traces with the frozen model (:func:`collect_traces`) or use dataset traces.
2. Train a :class:`BudgetPredictor` with :class:`BudgetPredictorModule` on :class:`TraceDataModule`.
3. Pass a :class:`BudgetGuidanceLogitsProcessor` to ``model.generate()``; :class:`BudgetForcing` is the
   baseline; :func:`estimate_thinking_length` predicts the thinking length before generating;
   :func:`calibrate_thresholds` fits the processor's trained-row thresholds to a predictor's held-out predictions.
"""

from lightning_tokens.budget.calibration import calibrate_thresholds
from lightning_tokens.budget.capture import HiddenStateCapture
from lightning_tokens.budget.data import TraceDataModule, encode_traces, remaining_lengths
from lightning_tokens.budget.forcing import BudgetForcing
from lightning_tokens.budget.gamma import decoded_mode, gamma_cdf, gamma_nll
from lightning_tokens.budget.guidance import BudgetGuidanceLogitsProcessor, estimate_thinking_length, guidance_weights
from lightning_tokens.budget.module import BudgetPredictorModule
from lightning_tokens.budget.predictor import BudgetPredictor, PredictorConfig
from lightning_tokens.budget.traces import collect_traces

__all__ = [
    "BudgetForcing",
    "BudgetGuidanceLogitsProcessor",
    "BudgetPredictor",
    "BudgetPredictorModule",
    "HiddenStateCapture",
    "PredictorConfig",
    "TraceDataModule",
    "calibrate_thresholds",
    "collect_main",
    "collect_traces",
    "decoded_mode",
    "encode_traces",
    "estimate_thinking_length",
    "gamma_cdf",
    "gamma_nll",
    "guidance_weights",
    "remaining_lengths",
]


def __getattr__(name: str):
    # ``collect_main`` (the ``lightning-tokens collect-traces`` command) moved to the CLI, which imports the library and
    # never the reverse; its 0.1 import path still works, importing the CLI only when asked for.
    if name == "collect_main":
        from lightning_tokens.cli.commands import collect_main

        return collect_main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
