"""Layer heads: each head is a copy of the model's last decoder layer (Gloeckle et al. 2024), so with the main head
the model gets K + 1 parallel last layers.

Layer heads are always called with an explicit causal + padding mask (an additive float mask, which eager and
SDPA attention both accept) and with the rotary embeddings the model itself computed for its last layer, so
they are causal whatever attention implementation the model uses.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from lightning_tokens.caft.trunk import Trunk, causal_additive_mask
from lightning_tokens.caft.variant import HeadVariant
from lightning_tokens.modeling import (
    CACHE_KEYWORDS,
    cache_keyword,
    causal_lm_of,
    decoder_layers,
    decoder_of,
    has_position_bias,
)

if TYPE_CHECKING:
    from lightning_tokens.caft.heads import MultiTokenHeads


class LayerVariant(HeadVariant):
    """Heads that are copies of the last decoder layer (reference code: ``head_arch="transformer"``)."""

    name = "layer"
    attends = True

    def build(self, base: nn.Module, num_heads: int, init_from_model: bool) -> tuple[nn.ModuleList, None]:
        layers = decoder_layers(base)
        last = layers[-1]
        self.unused_arguments = unused_layer_arguments(base, last)
        blocks = []
        for _ in range(num_heads):
            block = type(last)(base.config, len(layers) - 1)
            if init_from_model:
                copy_layer_weights(block, last)
            blocks.append(block)
        return nn.ModuleList(blocks), None

    def head_states(self, heads: MultiTokenHeads, k: int, trunk: Trunk, attention_mask: Optional[Tensor],
                    cache: Any, past_length: int, segments: Optional[Tensor],
                    additive_mask: Optional[Tensor]) -> Tensor:
        block = heads.blocks[k - 1]
        dtype = next(block.parameters()).dtype
        hidden = trunk.hidden.to(dtype)
        batch, length = hidden.shape[:2]
        mask = additive_mask if additive_mask is not None else causal_additive_mask(
            attention_mask, length, past_length, dtype, hidden.device, batch, segments)
        kwargs: dict[str, Any] = {"attention_mask": mask, cache_keyword(block): cache, "use_cache": cache is not None,
                                  **dict.fromkeys(self.unused_arguments)}
        if trunk.position_embeddings is not None:
            kwargs["position_embeddings"] = tuple(p.to(dtype) for p in trunk.position_embeddings)
        if trunk.position_ids is not None:
            kwargs["position_ids"] = trunk.position_ids
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


#: Arguments of a decoder layer's forward that :meth:`MultiTokenHeads.head_states` fills itself.
_GIVEN_ARGUMENTS = frozenset({"attention_mask", "position_embeddings", "position_ids", "use_cache", *CACHE_KEYWORDS})


def unused_layer_arguments(model: nn.Module, layer: nn.Module) -> tuple[str, ...]:
    """The arguments ``layer``'s forward requires that layer heads do not give, each checked to be ``None`` in the
    model's own call of ``layer`` (Falcon's ``alibi`` without ALiBi); heads pass them as ``None``.

    One forward of two tokens, under ``no_grad``, records the model's own call of ``layer``.

    Raises:
        ValueError: The model gives ``layer`` a position bias, as such an argument (Falcon's ALiBi on transformers
            5.23) or added to its attention mask (Falcon's ALiBi on later versions): a head, run with its own mask,
            would leave it out. Names the model type and the argument.
    """
    parameters = list(inspect.signature(type(layer).forward).parameters.values())[2:]  # self, hidden_states
    required = tuple(p.name for p in parameters if p.default is p.empty and p.name not in _GIVEN_ARGUMENTS
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    base = causal_lm_of(model)
    calls: list[inspect.BoundArguments] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(inspect.signature(module.forward).bind_partial(*args, **kwargs))

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    device = base.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            decoder_of(base)(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        handle.remove()
    given = calls[0].arguments if calls else {}
    biased = [name for name in required if given.get(name) is not None]
    if has_position_bias(given.get("attention_mask")):
        biased.append("attention_mask")
    if biased:
        model_type = getattr(base.config, "model_type", type(base).__name__)
        raise ValueError(f"MultiTokenHeads: the decoder layers of model type {model_type!r} take {biased[0]!r} with a "
                         "position bias from the model (ALiBi), which a layer head run with its own mask would leave "
                         "out; use architecture='resblock'")
    return required


def _source_weight(module: nn.Module) -> Tensor:
    """A linear module's weight in full precision, through PEFT wrappers and bitsandbytes quantization."""
    module = getattr(module, "base_layer", module)
    weight = module.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module)
    return weight


def copy_layer_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s base weights into ``target`` (same class); LoRA adapters and quantization are undone."""
    with torch.no_grad():
        for name, param in target.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = source.get_submodule(owner_name) if owner_name else source
            owner = getattr(owner, "base_layer", owner)
            value = _source_weight(owner) if leaf == "weight" else getattr(owner, leaf)
            if value.shape != param.shape and value.numel() == param.numel():
                value = value.reshape(param.shape)  # gpt2 Conv1D stores the same weights
            param.copy_(value.to(param.dtype))
