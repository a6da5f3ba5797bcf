"""lightning-tokens: token-level training methods for Hugging Face causal LMs as Lightning plugins.

One name per method, the same everywhere: its package ``lightning_tokens/<method>``, its configs
``lightning_tokens/configs/<method>/<model>.yaml`` (named ``<method>/<model>`` on the command line) and, where it
has them, its benchmarks ``benchmarks/<method>_<speed|memory>.py`` and its evidence protocol
``experiments/protocols/<method>.py``. The methods: ``sft`` (plain fine-tuning, :mod:`lightning_tokens.sft`),
``sstoken`` (token selection), ``caft`` (multi-token heads), ``quiet_star`` (thought tokens) and ``budget`` (budget
guidance). The 0.1 names ``selection``, ``heads``, ``thoughts`` and ``module`` still
import, as aliases of the same modules (:mod:`lightning_tokens._renamed`).
"""

from importlib.metadata import PackageNotFoundError, version

from lightning_tokens.budget import (
    BudgetForcing,
    BudgetGuidanceLogitsProcessor,
    BudgetPredictor,
    BudgetPredictorModule,
    PredictorConfig,
    TraceDataModule,
    collect_traces,
    estimate_thinking_length,
)
from lightning_tokens.caft import (
    ConceptAwareFineTuning,
    MultiTokenHeads,
    MultiTokenHeadsModule,
    export_mtp,
    generate_with_heads,
    self_distill,
)
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.packing import PackedCollator, PackingError
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.tokenizer import load_task_tokenizer
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from lightning_tokens.optim import OptimizerConfig, ResumesExactly
from lightning_tokens.predict import PredictionWriter
from lightning_tokens.quantization import keep_4bit_weights_unpacked
from lightning_tokens.quiet_star import QuietSTaRModule, thoughtful_generate
from lightning_tokens.quiet_star.data import PlainTextDataModule
from lightning_tokens.reasoning import check_answer, extract_answer
from lightning_tokens.sft import CausalLMModule
from lightning_tokens.sstoken import RunawaySelection, TokenSelection
from lightning_tokens.token_loss import (
    LogitsNotKept,
    PlainLoss,
    TokenLossCallback,
    TokenLossContext,
    TokenLossDispatcher,
    UnsupportedLoss,
)

try:
    __version__ = version("lightning-tokens")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BudgetForcing",
    "BudgetGuidanceLogitsProcessor",
    "BudgetPredictor",
    "BudgetPredictorModule",
    "CausalLMModule",
    "ConceptAwareFineTuning",
    "LogitsNotKept",
    "ModelSpec",
    "MultiTokenHeads",
    "MultiTokenHeadsModule",
    "OptimizerConfig",
    "PackedCollator",
    "PackingError",
    "PlainLoss",
    "PlainTextDataModule",
    "PredictionWriter",
    "PredictorConfig",
    "QuietSTaRModule",
    "ReasoningTask",
    "ResumesExactly",
    "RunawaySelection",
    "SFTDataModule",
    "TokenLossCallback",
    "TokenLossContext",
    "TokenLossDispatcher",
    "TokenSelection",
    "TraceDataModule",
    "UnsupportedLoss",
    "check_answer",
    "collect_traces",
    "estimate_thinking_length",
    "extract_answer",
    "export_mtp",
    "generate_with_heads",
    "keep_4bit_weights_unpacked",
    "load_causal_lm",
    "load_task_tokenizer",
    "self_distill",
    "thoughtful_generate",
]
