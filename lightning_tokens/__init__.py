"""lightning-tokens: token-level training methods for Hugging Face causal LMs as Lightning plugins."""

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
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.packing import PackedCollator, PackingError
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.tokenizer import load_task_tokenizer
from lightning_tokens.heads import (
    ConceptAwareFineTuning,
    MultiTokenHeads,
    MultiTokenHeadsModule,
    export_mtp,
    generate_with_heads,
    self_distill,
)
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from lightning_tokens.module import CausalLMModule
from lightning_tokens.optim import OptimizerConfig, ResumesExactly
from lightning_tokens.predict import PredictionWriter
from lightning_tokens.quantization import keep_4bit_weights_unpacked
from lightning_tokens.reasoning import check_answer, extract_answer
from lightning_tokens.selection import TokenSelection
from lightning_tokens.thoughts import QuietSTaRModule, thoughtful_generate
from lightning_tokens.thoughts.data import PlainTextDataModule
from lightning_tokens.token_loss import (
    LogitsNotKept,
    PlainLoss,
    TokenLossCallback,
    TokenLossContext,
    TokenLossDispatcher,
    UnsupportedLoss,
)

__version__ = "0.1.0"

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
