"""CAFT: concept-aware fine-tuning with multi-token auxiliary heads (arXiv 2506.07833).

Stage 1 (:class:`MultiTokenHeadsModule`) pre-trains :class:`MultiTokenHeads` on a frozen model; stage 2
(:class:`ConceptAwareFineTuning`) adds their losses to any fine-tuning loop; :func:`generate_with_heads`
reuses them as a draft model for exact greedy self-speculative decoding. For models that ship
multi-token-prediction layers (DeepSeek-V3, GLM-4.5), :meth:`MultiTokenHeads.from_model` takes those as the heads
and :func:`export_mtp` writes them back in the model's own checkpoint layout.
"""

from lightning_tokens.caft.callback import ConceptAwareFineTuning
from lightning_tokens.caft.distill import self_distill
from lightning_tokens.caft.heads import MultiTokenHeads, ResBlock, Trunk, capture_trunk
from lightning_tokens.caft.loss import HeadLoss, head_losses
from lightning_tokens.caft.module import MultiTokenHeadsModule
from lightning_tokens.caft.mtp import export_mtp
from lightning_tokens.caft.schedule import schedule_value
from lightning_tokens.caft.speculative import SpeculativeStats, generate_with_heads

__all__ = [
    "ConceptAwareFineTuning",
    "HeadLoss",
    "MultiTokenHeads",
    "MultiTokenHeadsModule",
    "ResBlock",
    "SpeculativeStats",
    "Trunk",
    "capture_trunk",
    "export_mtp",
    "generate_with_heads",
    "head_losses",
    "schedule_value",
    "self_distill",
]
