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

It follows each layer's own attention: Gemma 2's soft cap of the scores (the keyword the layer passes; the fused CPU
kernel cannot apply it, so such layers take the chunked path) and a sliding window where the layer has one (see
:func:`~lightning_tokens.quiet_star.parallel.layer_windows`). At pass ``k`` the query at position ``i`` stands at index
``i + k`` of the sequence it re-runs, so a window ``W`` lets it read the text keys ``j > i + k - W`` and the keys of
passes ``p > k - W``: those layers get a text mask per pass, built once for all of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from lightning_tokens.quiet_star.fused_attention import (
    TextMask,
    WindowBuffer,
    fused_kernel_applies,
    fused_two_part_attention,
)

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
    softcap: Optional[float] = None  # scores become softcap * tanh(scores / softcap) (Gemma 2)


class TwoPartAttention(torch.autograd.Function):
    """Softmax attention of thought queries over the text's keys (masked) and their own window of keys (one per
    pass, at the query's own position), exactly; scores recomputed in the backward, a chunk of queries at a time.

    Shapes: ``query (R, H, L, d)`` with ``R = B * n`` rows (thought ``t`` of row ``b`` at ``b * n + t``);
    ``text_key (B, K, L_text, d)``, ``text_value (B, K, L_text, d_v)``; ``allowed (B, L, L_text)`` bool; each window
    key ``(R, K, L, d)`` and value ``(R, K, L, d_v)``. Output ``(R, H, L, d_v)``: values may have a head size of their
    own (DeepSeek's multi-head latent attention). With a soft cap ``c`` the scaled scores ``s`` become
    ``c * tanh(s / c)`` before the mask, as Gemma 2's attention does.
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


def _capped(scores: Tensor, softcap: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
    """``softcap * tanh(scores / softcap)`` and its slope ``1 - tanh^2``; ``scores`` and ``None`` without a cap."""
    if softcap is None:
        return scores, None
    tanh = torch.tanh(scores / softcap)
    return tanh * softcap, 1 - tanh * tanh


def _chunk_scores(q: Tensor, text_key: Tensor, allowed: Tensor, keys: Tensor, settings: _Settings, start: int,
                  stop: int) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Scores of grouped queries ``q (B, n, K, G, c, d)`` (queries ``start:stop``): text ``(B, n, K, G, c, L_text)``
    (``-inf`` where not allowed) and window ``(B, n, K, G, c, count)`` from stacked ``keys``, soft-capped where
    ``settings`` say so; then the slopes of the cap (``None`` without one)."""
    text = torch.einsum("bnkgcd,bksd->bnkgcs", q, text_key) * settings.scaling
    text, text_slope = _capped(text, settings.softcap)
    text = text.masked_fill(~allowed[:, None, None, None, start:stop], float("-inf"))
    own, own_slope = _capped(torch.einsum("bnkgcd,pbnkcd->bnkgcp", q, keys) * settings.scaling, settings.softcap)
    return text, own, text_slope, own_slope


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
    rows, heads, length = query.shape[:3]
    dim = text_value.shape[-1]
    text_key, text_value = text_key.to(acc), text_value.to(acc)
    out = query.new_empty(rows, heads, length, dim)
    lse = query.new_empty(rows, heads, length, dtype=acc)
    for start in range(0, length, settings.chunk):
        stop = min(start + settings.chunk, length)
        q = _grouped(query[:, :, start:stop], batch, kv_heads).to(acc)
        window_keys, window_values = _window(keys, start, stop, batch, acc), _window(values, start, stop, batch, acc)
        text, own, _, _ = _chunk_scores(q, text_key, allowed, window_keys, settings, start, stop)
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
    ``dV = (P M)^T dO``, ``dS = P (M (dO V^T) - D)`` (times the soft cap's slope), ``dQ = dS K``, ``dK = dS^T Q``
    (times the scaling)."""
    batch, kv_heads, acc = text_key.shape[0], text_key.shape[1], _accumulation(query)
    rows, heads, length, dim = query.shape
    key_dtype, value_dtype = text_key.dtype, text_value.dtype
    text_key, text_value = text_key.to(acc), text_value.to(acc)
    dq = torch.empty(rows, heads, length, dim, dtype=acc, device=query.device)
    dk_text, dv_text = torch.zeros_like(text_key), torch.zeros_like(text_value)
    dk_window = torch.empty(len(keys), rows, kv_heads, length, dim, dtype=acc, device=query.device)
    dv_window = torch.empty(len(keys), rows, kv_heads, length, text_value.shape[-1], dtype=acc, device=query.device)
    for start in range(0, length, settings.chunk):
        stop = min(start + settings.chunk, length)
        width = stop - start
        q = _grouped(query[:, :, start:stop], batch, kv_heads).to(acc)
        window_keys, window_values = _window(keys, start, stop, batch, acc), _window(values, start, stop, batch, acc)
        text, own, text_slope, own_slope = _chunk_scores(q, text_key, allowed, window_keys, settings, start, stop)
        log_total = _grouped(lse[:, :, start:stop, None], batch, kv_heads)  # (B, n, K, G, c, 1)
        p_text, p_own = torch.exp(text - log_total), torch.exp(own - log_total)
        keep_text, keep_own = _kept(settings, text, own, start)
        g = _grouped(grad_out[:, :, start:stop], batch, kv_heads).to(acc)
        o = _grouped(out[:, :, start:stop], batch, kv_heads).to(acc)
        delta = (g * o).sum(-1, keepdim=True)  # (B, n, K, G, c, 1)
        dv_text += torch.einsum("bnkgcs,bnkgcd->bksd", p_text * keep_text, g)
        d_text = p_text * (keep_text * torch.einsum("bnkgcd,bksd->bnkgcs", g, text_value) - delta)
        d_own = p_own * (keep_own * torch.einsum("bnkgcd,pbnkcd->bnkgcp", g, window_values) - delta)
        if settings.softcap is not None:
            d_text, d_own = d_text * text_slope, d_own * own_slope
        dk_text += torch.einsum("bnkgcs,bnkgcd->bksd", d_text, q)
        dq_chunk = (torch.einsum("bnkgcs,bksd->bnkgcd", d_text, text_key)
                    + torch.einsum("bnkgcp,pbnkcd->bnkgcd", d_own, window_keys))
        dq[:, :, start:stop] = (dq_chunk * settings.scaling).reshape(rows, heads, width, dim)
        shape = (len(keys), rows, kv_heads, width, -1)
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
                       buffer: Optional[WindowBuffer] = None, softcap: Optional[float] = None,
                       text_mask: Optional[TextMask] = None) -> Tensor:
    """Attention of thought queries over the text's keys (where ``allowed``) and their own window (see
    :class:`TwoPartAttention` for shapes). The window must hold at least the query's own current key.

    Args:
        query, text_key, text_value, allowed, window_keys, window_values: As in :class:`TwoPartAttention`.
        scaling: Factor of the scores: the attention module's own (``head_dim ** -0.5`` for most models, times
            DeepSeek's YaRN ``mscale`` squared where its rope scaling sets one).
        chunk: Queries per chunk of the scores. Default :data:`DEFAULT_QUERY_CHUNK`.
        dropout: Dropout probability on the attention probabilities. Default ``0.0``.
        generator: Where the dropout masks' seed is drawn from. Default ``None``: the global generator.
        fused: On the CPU without dropout nor soft cap, run the text part in PyTorch's fused attention kernel
            (:mod:`.fused_attention`); ``chunk`` then does not apply. Default ``True``.
        buffer: For the fused kernel, a buffer whose last written passes are the window (the passes keep one per
            layer). Default ``None``: built from the window.
        softcap: Soft cap ``c`` of the scaled scores ``s``: ``c * tanh(s / c)`` (Gemma 2's
            ``attn_logit_softcapping``). Default ``None``: none.
        text_mask: For the fused kernel, ``allowed`` as :meth:`TextMask.of` gives it (the passes build it once).
            Default ``None``: built from ``allowed``.
    """
    if not window_keys or len(window_keys) != len(window_values):
        raise ValueError("two_part_attention: the window needs as many keys as values, and at least one")
    if fused and softcap is None and fused_kernel_applies(query, dropout):
        return fused_two_part_attention(query, text_key, text_value, allowed, window_keys, window_values, scaling,
                                        buffer, text_mask)
    seed = int(torch.randint(0, 2**62, (), generator=generator)) if dropout else 0
    settings = _Settings(float(scaling), int(chunk), float(dropout), seed, None if softcap is None else float(softcap))
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
        sliding_windows: Per layer index, the sliding attention window of the layers that have one (a key ``j`` is
            read from index ``q`` only where ``q - j < window``). Default: none.
        query_index: ``(B, P)`` the position each thought slot thinks at, when not every position thinks (its
            queries at pass ``k`` sit at index ``position + k`` of the sequence the passes stand for). Default
            ``None``: slot ``i`` is position ``i``.
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
    sliding_windows: dict[int, int] = field(default_factory=dict)
    query_index: Optional[Tensor] = None
    _banded: dict[int, tuple[Tensor, Optional[TextMask]]] = field(default_factory=dict, init=False, repr=False)
    _banded_pass: int = field(default=-1, init=False, repr=False)  # the pass _banded holds the masks of

    def reach(self, layer: int) -> Optional[int]:
        """The window of ``layer`` where it hides some text key from some query of this pass, else ``None``."""
        window = self.sliding_windows.get(layer)
        return window if window is not None and self.allowed.shape[-1] - 1 + self.pass_index >= window else None

    def text_allowed(self, window: Optional[int]) -> Tensor:
        """``(B, P, L)`` bool: the text keys this pass's queries read at a layer of sliding ``window`` (``None``: all
        their rows of ``allowed``)."""
        rows = self.allowed if self.pass_index == 0 or self.query_allowed is None else self.query_allowed
        if window is None:
            return rows
        if self._banded_pass != self.pass_index:  # the earlier passes' masks live on in their autograd nodes only
            self._banded, self._banded_pass = {}, self.pass_index
        if window not in self._banded:
            keys = torch.arange(rows.shape[-1], device=rows.device)
            queries = keys if self.pass_index == 0 or self.query_index is None else self.query_index
            self._banded[window] = (rows & (queries[..., None] + self.pass_index - keys < window), None)
        return self._banded[window][0]

    def fused_text_mask(self, window: Optional[int], dtype: torch.dtype) -> TextMask:
        """:meth:`text_allowed` as the fused kernel takes it, built once per pass and window (once in all for none)."""
        if window is None:
            if self.fused_mask is None:
                self.fused_mask = TextMask.of(self.text_allowed(None), dtype)
            return self.fused_mask
        allowed = self.text_allowed(window)
        mask = self._banded[window][1]
        if mask is None:
            mask = TextMask.of(allowed, dtype)
            self._banded[window] = (allowed, mask)
        return mask


_active: Optional[ThoughtPassState] = None


def _text_attention(query: Tensor, key: Tensor, value: Tensor, allowed: Tensor, scaling: float, dropout: float,
                    softcap: Optional[float]) -> Tensor:
    """The text pass's attention ``(B, H, L, d_v)``: PyTorch's SDPA; with a soft cap, which SDPA does not apply, the
    scores written out as transformers' eager attention computes them (float32 softmax, cast to the queries' dtype)."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed[:, None], dropout_p=dropout, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = _capped(query @ key.transpose(-1, -2) * scaling, softcap)[0]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probabilities = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return torch.nn.functional.dropout(probabilities, dropout) @ value


def _thought_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                       dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any) -> tuple[Tensor, None]:
    """The attention function transformers calls in every layer while :func:`thought_attention_mode` is on."""
    state = _active
    if state is None:
        raise RuntimeError(f"attn_implementation {IMPLEMENTATION!r} only runs inside Quiet-STaR's thought passes")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    layer = module.layer_idx
    reach = state.reach(layer)
    allowed = state.text_allowed(reach)
    if state.pass_index == 0:
        state.text[layer] = (key, value)
        out = _text_attention(query, key, value, allowed, scaling, dropout, softcap)
    else:
        window = state.window.setdefault(layer, [])
        window.append((key, value))
        read = window if reach is None else window[-reach:]  # pass k reads pass p's key where k - p < window
        buffer = text_mask = None
        if state.capacity is not None and softcap is None and fused_kernel_applies(query, dropout):
            if layer not in state.buffers:
                state.buffers[layer] = WindowBuffer.like(key, value, state.text[layer][0].shape[0], state.capacity)
            buffer = state.buffers[layer]
            buffer.append(key, value)
            text_mask = state.fused_text_mask(reach, query.dtype)
        out = two_part_attention(query, *state.text[layer], allowed, [k for k, _ in read], [v for _, v in read],
                                 scaling, state.chunk, dropout, buffer=buffer, softcap=softcap, text_mask=text_mask)
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
