"""The interface every kind of head implements; :class:`~lightning_tokens.caft.heads.MultiTokenHeads` holds one.

A variant builds the head blocks for a model, runs them over a trunk, names the norm before the unembedding and
drafts for speculative decoding. :func:`~lightning_tokens.caft.heads.head_variant` picks one from the heads'
``architecture`` string, once; the rest of the package asks the variant instead of comparing that string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional

from torch import Tensor, nn

from lightning_tokens.caft.drafter import HeadDrafter
from lightning_tokens.caft.trunk import Trunk, final_norm
from lightning_tokens.modeling import causal_lm_of

if TYPE_CHECKING:
    from lightning_tokens.caft.heads import MultiTokenHeads


class HeadVariant:
    """One kind of head: how its blocks are built and run. A fresh instance serves one ``MultiTokenHeads``.

    Attributes:
        name: The ``architecture`` string of this kind, as saved in ``heads_config.json``.
        reads_final_hidden: The heads read the model's final hidden state and the input ids (see
            :func:`~lightning_tokens.caft.trunk.capture_trunk`'s ``final``) instead of the last layer's input.
        attends: Each head attends over earlier positions, so it needs a causal mask and, when decoding, a cache.
        in_checkpoint: Trained heads of this kind can come with the model's own checkpoint.
        unused_arguments: Arguments the heads' layers require and receive as ``None`` (set by :meth:`build`).
    """

    name: ClassVar[str]
    reads_final_hidden: ClassVar[bool] = False
    attends: ClassVar[bool] = False
    in_checkpoint: ClassVar[bool] = False

    def __init__(self) -> None:
        self.unused_arguments: tuple[str, ...] = ()

    def check(self, separate_unembedding: bool) -> None:
        """Raise ``ValueError`` for options this kind does not support. Every option is supported by default."""

    def build(self, base: nn.Module, num_heads: int,
              init_from_model: bool) -> tuple[nn.ModuleList, Optional[nn.Module]]:
        """The ``num_heads`` head blocks for causal LM ``base``, and a norm every head ends with (or ``None``).

        Args:
            base: The causal LM (PEFT and quantization wrappers taken off).
            num_heads: Number of heads K.
            init_from_model: Start the blocks from the model's last decoder layer where they have its shape.
        """
        raise NotImplementedError

    def head_states(self, heads: MultiTokenHeads, k: int, trunk: Trunk, attention_mask: Optional[Tensor],
                    cache: Any, past_length: int, segments: Optional[Tensor],
                    additive_mask: Optional[Tensor]) -> Tensor:
        """Hidden states of head ``k`` alone; see :meth:`MultiTokenHeads.head_states` for the arguments."""
        raise NotImplementedError

    def all_head_states(self, heads: MultiTokenHeads, model: nn.Module, trunk: Trunk,
                        attention_mask: Optional[Tensor], segments: Optional[Tensor],
                        depths: Optional[int]) -> Iterator[Tensor]:
        """Hidden states of heads ``1..depths`` in order; independent heads by default, one call each."""
        for k in range(1, (depths or heads.num_heads) + 1):
            yield heads.head_states(k, trunk, attention_mask, segments=segments)

    def norm(self, model: nn.Module) -> nn.Module:
        """The norm between a head's states and its unembedding: the model's final norm by default."""
        return final_norm(causal_lm_of(model))

    def drafter(self, heads: MultiTokenHeads, model: nn.Module, num_draft: int, prompt_ids: Tensor,
                prompt_mask: Tensor, max_new_tokens: int) -> Any:
        """What proposes the drafts in :func:`~lightning_tokens.caft.speculative.generate_with_heads`: an object
        whose ``advance`` gives ``(B, num_draft)`` drafts per round. Independent heads by default."""
        return HeadDrafter(heads, model, num_draft)
