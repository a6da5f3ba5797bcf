"""What the heads read (:class:`Trunk`), how it is recorded from a model's forward, and the masks heads attend with.

Every head variant and drafter builds on this module; it imports no other module of the package's heads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from lightning_tokens.modeling import causal_lm_of, decoder_layers

_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


@dataclass
class Trunk:
    """What the heads read: the input of the model's last decoder layer, and its positions.

    Attributes:
        hidden: ``(B, T, D)`` input hidden states of the last decoder layer; for MTP heads, the model's final
            hidden state (the output head's input).
        position_embeddings: The rotary ``(cos, sin)`` the model gave its layers, or ``None`` (gpt2).
        position_ids: ``(B, T)`` position ids the layer received, or ``None``.
        input_ids: ``(B, T)`` the input tokens, which MTP heads read ahead of each position; ``None`` for others.
    """

    hidden: Tensor
    position_embeddings: Optional[tuple[Tensor, Tensor]] = None
    position_ids: Optional[Tensor] = None
    input_ids: Optional[Tensor] = None

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict) -> "Trunk":
        """The trunk from the ``(args, kwargs)`` of a decoder-layer call."""
        hidden = args[0] if args else kwargs["hidden_states"]
        return cls(hidden, kwargs.get("position_embeddings"), kwargs.get("position_ids"))

    def detach(self) -> "Trunk":
        pe = self.position_embeddings
        return Trunk(self.hidden.detach(), None if pe is None else tuple(p.detach() for p in pe), self.position_ids,
                     self.input_ids)

    def narrow(self, start: int, length: int) -> "Trunk":
        """The trunk at positions ``start .. start + length - 1``."""
        pe = self.position_embeddings
        if pe is not None:
            pe = tuple(p.narrow(-2, start, length) if p.shape[-2] == self.hidden.shape[1] else p for p in pe)
        ids = self.position_ids
        if ids is not None and ids.shape[-1] == self.hidden.shape[1]:
            ids = ids.narrow(-1, start, length)
        tokens = None if self.input_ids is None else self.input_ids.narrow(1, start, length)
        return Trunk(self.hidden.narrow(1, start, length), pe, ids, tokens)


@contextmanager
def capture_trunk(model: nn.Module, final: bool = False) -> Iterator[dict[str, Trunk]]:
    """Record the :class:`Trunk` of ``model``'s forwards inside the block as ``holder["trunk"]`` (the last call).

    Args:
        model: The causal LM.
        final: Record what MTP heads read instead: the final hidden state (the final norm's output) and the
            input ids. Default ``False``: the last decoder layer's input.
    """
    holder: dict[str, Any] = {}

    def layer_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        holder["trunk"] = Trunk.from_call(args, kwargs)

    def ids_hook(module: nn.Module, args: tuple) -> None:
        holder["input_ids"] = args[0] if args else None

    def final_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        layer = holder.pop("trunk")
        holder["trunk"] = Trunk(output, None, layer.position_ids, holder.pop("input_ids", None))

    handles = [decoder_layers(model)[-1].register_forward_pre_hook(layer_hook, with_kwargs=True)]
    if final:
        base = causal_lm_of(model)
        handles.append(base.get_input_embeddings().register_forward_pre_hook(ids_hook))
        handles.append(final_norm(base).register_forward_hook(final_hook))
    try:
        yield holder
    finally:
        for handle in handles:
            handle.remove()


def final_norm(model: nn.Module) -> nn.Module:
    """The final norm of a causal LM (``model.norm``, ``transformer.ln_f``, ...), or the identity if it has none."""
    inner = causal_lm_of(model).base_model
    for name in _NORM_NAMES:
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


def causal_additive_mask(attention_mask: Optional[Tensor], query_length: int, past_length: int,
                         dtype: torch.dtype, device: torch.device, batch_size: int = 1,
                         segments: Optional[Tensor] = None) -> Tensor:
    """``(B, 1, q, past + q)`` additive mask: 0 where a query may attend, the dtype's minimum elsewhere.

    A query sees keys at or before its own position that are not padding; it always sees itself, so no row
    is empty (padding queries give finite, unused outputs instead of NaN).

    Args:
        attention_mask: ``(B, past + q)`` 1 on real tokens, or ``None`` for no padding.
        query_length: Number of queries ``q`` (the last ``q`` positions).
        past_length: Number of cached positions before the queries.
        dtype: Dtype of the mask (that of the attention scores).
        device: Its device.
        batch_size: ``B`` when ``attention_mask`` is ``None``. Default ``1``.
        segments: ``(B, past + q)`` sample number of each position of a packed row, or ``None``: a query then
            sees the keys of its own sample only. Default ``None``.
    """
    total = past_length + query_length
    query_pos = torch.arange(past_length, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :total].bool()
    else:
        allowed = allowed.expand(batch_size, -1, -1)
    if segments is not None:
        allowed = allowed & (segments[:, None, :total] == segments[:, past_length:total, None])
    allowed = allowed | (key_pos == query_pos)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
