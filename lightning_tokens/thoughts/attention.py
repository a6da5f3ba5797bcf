"""Attention of the thought passes, with the text's keys and values held once.

At thought pass ``k`` the query at position ``i`` reads two kinds of keys (see :mod:`.parallel`): the text's keys
``j`` its mask allows (causal, padding, its own sample) and the ``k`` keys passes ``1..k`` wrote at position ``i``
itself (its own thought so far). Held as one growing KV cache, the text part is copied into every pass's
concatenated keys, and autograd saves each concatenation: memory grows with the square of the pass count.

Here the text pass's keys and values are kept once, shared by every thought of a row, and each pass keeps its own
``(rows, kv_heads, L, d)`` keys and values; a pass's attention is one softmax over both parts, computed a chunk of
queries at a time by :class:`TwoPartAttention`, which saves its inputs (references, not copies), its output and
the log-sum-exp of every query, and recomputes the scores in its backward. Grouped-query attention reads the
``kv_heads`` without repeating them.

Models reach it through transformers' attention interface: :func:`thought_attention_mode` switches the model's
``_attn_implementation`` to :data:`IMPLEMENTATION` for the passes, and the function registered under that name
keeps the keys and values of each layer as the passes run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from lightning_tokens.thoughts.fused_attention import (TextMask, WindowBuffer, fused_kernel_applies,
                                                       fused_two_part_attention)

#: The name the thought attention is registered under in transformers' attention interfaces.
IMPLEMENTATION = "lightning_tokens_thoughts"

#: Queries per chunk of the score computation (memory ``chunk x L`` per chunk, not ``L x L``).
DEFAULT_QUERY_CHUNK = 256


def _grouped(query: Tensor, batch: int, kv_heads: int) -> Tensor:
    """``(rows, heads, L, d)`` as ``(batch, n, kv_heads, groups, L, d)``: the thoughts of a row and the query heads
    sharing a kv head get axes of their own, so the text's ``(batch, kv_heads, L, d)`` broadcasts over both."""
    rows, heads, length, dim = query.shape
    return query.view(batch, rows // batch, kv_heads, heads // kv_heads, length, dim)


@dataclass(frozen=True)
class _Settings:
    scaling: float
    chunk: int
    dropout: float = 0.0
    seed: int = 0  # of the dropout masks, drawn again chunk by chunk in the backward


class TwoPartAttention(torch.autograd.Function):
    """Softmax attention of thought queries over the text's keys (masked) and their own window of keys (one per
    pass, at the query's own position), exactly; scores recomputed in the backward, a chunk of queries at a time.

    Shapes: ``query (R, H, L, d)`` with ``R = B * n`` rows (thought ``t`` of row ``b`` at ``b * n + t``);
    ``text_key, text_value (B, K, L_text, d)``; ``allowed (B, L, L_text)`` bool; each window key and value
    ``(R, K, L, d)``. Output ``(R, H, L, d)``.
    """

    @staticmethod
    def forward(ctx: Any, query: Tensor, text_key: Tensor, text_value: Tensor, allowed: Tensor, settings: _Settings,
                *window: Tensor) -> Tensor:
        count = len(window) // 2
        keys, values = window[:count], window[count:]
        out, lse = _two_part_forward(query, text_key, text_value, allowed, keys, values, settings)
        ctx.save_for_backward(query, text_key, text_value, allowed, out, lse, *window)
        ctx.settings, ctx.count = settings, count
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        query, text_key, text_value, allowed, out, lse, *window = ctx.saved_tensors
        keys, values = window[:ctx.count], window[ctx.count:]
        dq, dk_text, dv_text, dk_window, dv_window = _two_part_backward(
            query, text_key, text_value, allowed, keys, values, out, lse, grad_out, ctx.settings)
        return (dq, dk_text, dv_text, None, None, *dk_window, *dv_window)


def _accumulation(tensor: Tensor) -> torch.dtype:
    """The dtype scores and sums are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _window(tensors: tuple[Tensor, ...], start: int, stop: int, batch: int, acc: torch.dtype) -> Tensor:
    """Queries ``start:stop`` of every window tensor, stacked: ``(count, B, n, K, c, d)``."""
    stacked = torch.stack([t[:, :, start:stop] for t in tensors])
    count, rows = stacked.shape[:2]
    return stacked.view(count, batch, rows // batch, *stacked.shape[2:]).to(acc)


def _chunk_scores(q: Tensor, text_key: Tensor, allowed: Tensor, keys: Tensor, scaling: float, start: int,
                  stop: int) -> tuple[Tensor, Tensor]:
    """Scores of grouped queries ``q (B, n, K, G, c, d)`` (queries ``start:stop``): text ``(B, n, K, G, c, L_text)``
    (``-inf`` where not allowed) and window ``(B, n, K, G, c, count)`` from stacked ``keys``."""
    text = torch.einsum("bnkgcd,bksd->bnkgcs", q, text_key) * scaling
    text = text.masked_fill(~allowed[:, None, None, None, start:stop], float("-inf"))
    own = torch.einsum("bnkgcd,pbnkcd->bnkgcp", q, keys) * scaling
    return text, own


def _kept(settings: _Settings, text: Tensor, own: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Dropout's keep masks of a chunk of probabilities, scaled by ``1 / (1 - p)`` (ones without dropout); the
    same in the forward and the backward (drawn from the seed and the chunk's first query)."""
    if not settings.dropout:
        return text.new_ones(()), own.new_ones(())
    generator = torch.Generator(device=text.device).manual_seed(settings.seed + start)
    keep = 1.0 / (1.0 - settings.dropout)
    draw = [torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype) for t in (text, own)]
    return (draw[0] >= settings.dropout) * keep, (draw[1] >= settings.dropout) * keep


def _two_part_forward(query, text_key, text_value, allowed, keys, values, settings):
    batch, kv_heads, acc = text_key.shape[0], text_key.shape[1], _accumulation(query)
    rows, heads, length, dim = query.shape
    text_key, text_value = text_key.to(acc), text_value.to(acc)
    out = query.new_empty(rows, heads, length, dim)
    lse = query.new_empty(rows, heads, length, dtype=acc)
    for start in range(0, length, settings.chunk):
        stop = min(start + settings.chunk, length)
        q = _grouped(query[:, :, start:stop], batch, kv_heads).to(acc)
        window_keys, window_values = _window(keys, start, stop, batch, acc), _window(values, start, stop, batch, acc)
        text, own = _chunk_scores(q, text_key, allowed, window_keys, settings.scaling, start, stop)
        top = torch.maximum(text.amax(-1), own.amax(-1))  # own always holds the query's own key: finite
        p_text, p_own = torch.exp(text - top[..., None]), torch.exp(own - top[..., None])
        total = p_text.sum(-1) + p_own.sum(-1)
        keep_text, keep_own = _kept(settings, text, own, start)
        mixed = (torch.einsum("bnkgcs,bksd->bnkgcd", p_text * keep_text, text_value)
                 + torch.einsum("bnkgcp,pbnkcd->bnkgcd", p_own * keep_own, window_values)) / total[..., None]
        out[:, :, start:stop] = mixed.reshape(rows, heads, stop - start, dim).to(out.dtype)
        lse[:, :, start:stop] = (top + total.log()).reshape(rows, heads, stop - start)
    return out, lse


def _two_part_backward(query, text_key, text_value, allowed, keys, values, out, lse, grad_out, settings):
    """With ``P`` the probabilities, ``M`` dropout's scaled keep mask and ``D = rowsum(dO * O)``:
    ``dV = (P M)^T dO``, ``dS = P (M (dO V^T) - D)``, ``dQ = dS K``, ``dK = dS^T Q`` (times the scaling)."""
    batch, kv_heads, acc = text_key.shape[0], text_key.shape[1], _accumulation(query)
    rows, heads, length, dim = query.shape
    key_dtype, value_dtype = text_key.dtype, text_value.dtype
    text_key, text_value = text_key.to(acc), text_value.to(acc)
    dq = torch.empty(rows, heads, length, dim, dtype=acc, device=query.device)
    dk_text, dv_text = torch.zeros_like(text_key), torch.zeros_like(text_value)
    dk_window = torch.empty(len(keys), rows, kv_heads, length, dim, dtype=acc, device=query.device)
    dv_window = torch.empty_like(dk_window)
    for start in range(0, length, settings.chunk):
        stop = min(start + settings.chunk, length)
        width = stop - start
        q = _grouped(query[:, :, start:stop], batch, kv_heads).to(acc)
        window_keys, window_values = _window(keys, start, stop, batch, acc), _window(values, start, stop, batch, acc)
        text, own = _chunk_scores(q, text_key, allowed, window_keys, settings.scaling, start, stop)
        log_total = _grouped(lse[:, :, start:stop, None], batch, kv_heads)  # (B, n, K, G, c, 1)
        p_text, p_own = torch.exp(text - log_total), torch.exp(own - log_total)
        keep_text, keep_own = _kept(settings, text, own, start)
        g = _grouped(grad_out[:, :, start:stop], batch, kv_heads).to(acc)
        o = _grouped(out[:, :, start:stop], batch, kv_heads).to(acc)
        delta = (g * o).sum(-1, keepdim=True)  # (B, n, K, G, c, 1)
        dv_text += torch.einsum("bnkgcs,bnkgcd->bksd", p_text * keep_text, g)
        d_text = p_text * (keep_text * torch.einsum("bnkgcd,bksd->bnkgcs", g, text_value) - delta)
        d_own = p_own * (keep_own * torch.einsum("bnkgcd,pbnkcd->bnkgcp", g, window_values) - delta)
        dk_text += torch.einsum("bnkgcs,bnkgcd->bksd", d_text, q)
        dq_chunk = (torch.einsum("bnkgcs,bksd->bnkgcd", d_text, text_key)
                    + torch.einsum("bnkgcp,pbnkcd->bnkgcd", d_own, window_keys))
        dq[:, :, start:stop] = (dq_chunk * settings.scaling).reshape(rows, heads, width, dim)
        shape = (len(keys), rows, kv_heads, width, dim)
        dk_window[:, :, :, start:stop] = torch.einsum("bnkgcp,bnkgcd->pbnkcd", d_own, q).reshape(shape)
        dv_window[:, :, :, start:stop] = torch.einsum("bnkgcp,bnkgcd->pbnkcd", p_own * keep_own, g).reshape(shape)
    dk_text *= settings.scaling
    dk_window *= settings.scaling
    return (dq.to(query.dtype), dk_text.to(key_dtype), dv_text.to(value_dtype),
            [d.to(k.dtype) for d, k in zip(dk_window.unbind(0), keys)],
            [d.to(v.dtype) for d, v in zip(dv_window.unbind(0), values)])


def two_part_attention(query: Tensor, text_key: Tensor, text_value: Tensor, allowed: Tensor,
                       window_keys: list[Tensor], window_values: list[Tensor], scaling: float,
                       chunk: int = DEFAULT_QUERY_CHUNK, dropout: float = 0.0,
                       generator: Optional[torch.Generator] = None, fused: bool = True,
                       buffer: Optional[WindowBuffer] = None) -> Tensor:
    """Attention of thought queries over the text's keys (where ``allowed``) and their own window (see
    :class:`TwoPartAttention` for shapes). The window must hold at least the query's own current key.

    Args:
        query, text_key, text_value, allowed, window_keys, window_values: As in :class:`TwoPartAttention`.
        scaling: Factor of the scores (``head_dim ** -0.5`` for most models).
        chunk: Queries per chunk of the scores. Default :data:`DEFAULT_QUERY_CHUNK`.
        dropout: Dropout probability on the attention probabilities. Default ``0.0``.
        generator: Where the dropout masks' seed is drawn from. Default ``None``: the global generator.
        fused: On the CPU without dropout, run the text part in PyTorch's fused attention kernel
            (:mod:`.fused_attention`); ``chunk`` then does not apply. Default ``True``.
        buffer: For the fused kernel, the window already written into a buffer (the passes keep one per layer).
            Default ``None``: built from the window.
    """
    if not window_keys or len(window_keys) != len(window_values):
        raise ValueError("two_part_attention: the window needs as many keys as values, and at least one")
    if fused and fused_kernel_applies(query, dropout):
        return fused_two_part_attention(query, text_key, text_value, allowed, window_keys, window_values, scaling,
                                        buffer)
    seed = int(torch.randint(0, 2**62, (), generator=generator)) if dropout else 0
    settings = _Settings(float(scaling), int(chunk), float(dropout), seed)
    return TwoPartAttention.apply(query, text_key, text_value, allowed, settings, *window_keys, *window_values)


# -- transformers' side: the passes' attention, registered as an attention implementation --------------------
@dataclass
class ThoughtPassState:
    """The keys and values the thought attention keeps while the passes of one batch run.

    Attributes:
        allowed: ``(B, L, L)`` bool text mask (query ``i`` may read text key ``j``).
        query_allowed: ``(B, P, L)`` the rows of ``allowed`` of the positions the thought passes run at, when not
            every position thinks (``think_at``). Default ``None``: ``allowed``.
        chunk: Queries per chunk of the score computation.
        pass_index: The pass running now: 0 is the text pass (``B`` rows), later ones are thought and talk
            passes (``B * n`` rows).
        text: Per layer index, the text pass's ``(key, value)``, each ``(B, K, L, d)``.
        window: Per layer index, every later pass's ``(key, value)``, each ``(B * n, K, L, d)``.
        capacity: How many passes follow the text pass. Default ``None``: unknown (no window buffers).
        buffers: Per layer index, the window written into one buffer for the fused CPU kernel.
        fused_mask: The thought passes' text mask as the fused kernel takes it (built once).
    """

    allowed: Tensor
    chunk: int = DEFAULT_QUERY_CHUNK
    query_allowed: Optional[Tensor] = None
    pass_index: int = 0
    text: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    window: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    capacity: Optional[int] = None
    buffers: dict[int, WindowBuffer] = field(default_factory=dict)
    fused_mask: Optional[TextMask] = None


_active: Optional[ThoughtPassState] = None


def _thought_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                       dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any) -> tuple[Tensor, None]:
    """The attention function transformers calls in every layer while :func:`thought_attention_mode` is on."""
    state = _active
    if state is None:
        raise RuntimeError(f"attn_implementation {IMPLEMENTATION!r} only runs inside Quiet-STaR's thought passes")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    layer = module.layer_idx
    if state.pass_index == 0:
        state.text[layer] = (key, value)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=state.allowed[:, None], dropout_p=dropout, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
    else:
        window = state.window.setdefault(layer, [])
        window.append((key, value))
        allowed = state.allowed if state.query_allowed is None else state.query_allowed
        buffer = None
        if state.capacity is not None and fused_kernel_applies(query, dropout):
            if layer not in state.buffers:
                if state.fused_mask is None:
                    state.fused_mask = TextMask.of(allowed, query.dtype)
                state.buffers[layer] = WindowBuffer.like(key, state.text[layer][0].shape[0], state.capacity,
                                                         state.fused_mask)
            buffer = state.buffers[layer]
            buffer.append(key, value)
        out = two_part_attention(query, *state.text[layer], allowed, [k for k, _ in window],
                                 [v for _, v in window], scaling, state.chunk, dropout, buffer=buffer)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The thought attention builds its own masks: transformers' mask builders return nothing for it."""
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _thought_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


@contextlib.contextmanager
def thought_attention_mode(lm: nn.Module, state: ThoughtPassState) -> Iterator[ThoughtPassState]:
    """Within: every attention layer of ``lm`` runs the thought attention on ``state`` (set ``state.pass_index``
    before each pass); the model's attention implementation is restored on exit."""
    global _active
    if _active is not None:
        raise RuntimeError("Quiet-STaR's thought passes do not nest")
    _register()
    config = lm.config
    previous = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    _active = state
    try:
        yield state
    finally:
        _active = None
        config._attn_implementation = previous


__all__ = ["DEFAULT_QUERY_CHUNK", "IMPLEMENTATION", "ThoughtPassState", "thought_attention_mode", "two_part_attention"]
