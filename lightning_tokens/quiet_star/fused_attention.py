"""The thought passes' two-part attention on PyTorch's fused CPU attention kernel.

The text part (every thought query against the text's keys, the long part) runs in the kernel PyTorch's own
scaled-dot-product attention uses on the CPU, which also returns each query's log-sum-exp; the window part (at most
``thought_length + n_ahead_talk + 1`` keys per query) is a small batched matmul; the two merge exactly by their
log-sum-exps, as split-key (flash-decoding) attention does. The kernel reads grouped-query keys without repeating
them, and the ``n`` thoughts of a row become ``n`` times the query heads of one text row, so the text's keys are
read, not copied.

The window's keys and values live in a :class:`WindowBuffer` per layer, laid out so that each query's own keys are
contiguous: each pass writes its keys once, and no pass copies the earlier ones again.

Backward: the kernel's own backward gets the output gradient scaled by the text part's share of the softmax
(``exp(lse_text - lse)``) and the merged output, so its ``rowsum(dO * O)`` term is the merged softmax's; the window
part's gradients follow from the same formulas as batched matmuls.

Layouts (``B`` text rows, ``n`` thoughts per row, ``K`` kv heads, ``G`` query heads per kv head, ``P`` queries):
queries arrive as ``(B * n, K * G, P, d)``; the kernel takes them "folded" as ``(B, K * n * G, P, d)``; the window
part works on ``(B, K, n, P, G, d)``, one small matrix per query.

Values may have another head size than queries and keys (DeepSeek's multi-head latent attention: 128 against 192).
The kernel takes one head size: its inputs are padded with zeros to the larger one, which leaves the scores as they
are and gives zero output columns, cut off again; the padded copies live only during the kernel's call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_KERNEL_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def fused_kernel_applies(query: Tensor, dropout: float) -> bool:
    """Whether :class:`FusedTwoPartAttention` runs here: a CPU tensor, no attention dropout (its masks could not be
    drawn again in the backward) and a PyTorch that has the kernel."""
    return query.device.type == "cpu" and not dropout and _KERNEL is not None and _KERNEL_BACKWARD is not None


@dataclass(frozen=True)
class TextMask:
    """The text mask as the kernel and the merge take it, built once for every layer and pass (once per pass for
    the layers of a sliding window, whose reach moves with the pass).

    Attributes:
        additive: ``(B, 1, P, L)`` 0 where allowed, ``-inf`` elsewhere, in the queries' dtype.
        reads_text: ``(B, 1, 1, P, 1)`` bool: the query may read some text key (the kernel gives a query that may
            read none a finite log-sum-exp; only its window then counts).
    """

    additive: Tensor
    reads_text: Tensor

    @classmethod
    def of(cls, allowed: Tensor, dtype: torch.dtype) -> "TextMask":
        """From the ``(B, P, L)`` bool mask."""
        additive = torch.where(allowed[:, None], 0.0, float("-inf")).to(dtype)
        return cls(additive, allowed.any(-1)[:, None, None, :, None])


@dataclass
class WindowBuffer:
    """One layer's window keys and values, ``(B, K, n, P, capacity, d)`` each (``d`` the key's or the value's head
    size), filled one pass at a time.

    Attributes:
        keys: The keys buffer.
        values: The values buffer.
        count: Passes written so far.
    """

    keys: Tensor
    values: Tensor
    count: int = 0

    @classmethod
    def like(cls, key: Tensor, value: Tensor, batch: int, capacity: int) -> "WindowBuffer":
        """An empty buffer for window keys and values shaped like ``key`` and ``value`` (``(B * n, K, P, d)``)."""

        def empty(like: Tensor) -> Tensor:
            rows, kv_heads, length, dim = like.shape
            return like.new_empty(batch, kv_heads, rows // batch, length, capacity, dim)

        return cls(empty(key), empty(value))

    def append(self, key: Tensor, value: Tensor) -> None:
        """Write one pass's ``(B * n, K, P, d)`` key and value (their data: gradients reach them through the
        attention, which takes them as inputs)."""
        if self.count == self.keys.shape[4]:
            raise RuntimeError(f"WindowBuffer: all {self.count} passes are written")
        with torch.no_grad():
            for buffer, tensor in ((self.keys, key), (self.values, value)):
                batch, kv_heads, n, length, _, dim = buffer.shape
                buffer[:, :, :, :, self.count].copy_(tensor.view(batch, n, kv_heads, length, dim).transpose(1, 2))
        self.count += 1

    def written(self, last: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """The written keys and values ``(B, K, n, P, count, d)`` (the ``last`` passes written only, when given), as
        tensors the later writes do not count as changes of (autograd saves them; the slots they cover are never
        written again)."""
        first = 0 if last is None else max(0, self.count - last)
        return self.keys.data[..., first:self.count, :], self.values.data[..., first:self.count, :]


def _fold(query: Tensor, batch: int, kv_heads: int) -> Tensor:
    """``(B * n, K * G, P, d)`` as ``(B, K * n * G, P, d)``: a text row's thoughts as more heads, grouped by kv head
    (head ``k * n * G + t * G + g`` reads kv head ``k``)."""
    rows, heads, length, dim = query.shape
    n, groups = rows // batch, heads // kv_heads
    grouped = query.view(batch, n, kv_heads, groups, length, dim).transpose(1, 2)
    return grouped.reshape(batch, kv_heads * n * groups, length, dim)


def _per_query(tensor: Tensor, batch: int, kv_heads: int) -> Tensor:
    """``(B * n, K * G, P, d)`` as ``(B, K, n, P, G, d)`` (a copy)."""
    rows, heads, length, dim = tensor.shape
    grouped = tensor.view(batch, rows // batch, kv_heads, heads // kv_heads, length, dim)
    return grouped.permute(0, 2, 1, 4, 3, 5).contiguous()


def _from_per_query(tensor: Tensor) -> Tensor:
    """``(B, K, n, P, G, d)`` as ``(B * n, K * G, P, d)``."""
    batch, kv_heads, n, length, groups, dim = tensor.shape
    return tensor.permute(0, 2, 1, 4, 3, 5).reshape(batch * n, kv_heads * groups, length, dim)


def _folded_as_per_query(folded: Tensor, kv_heads: int, n: int) -> Tensor:
    """A folded ``(B, K * n * G, P, d)`` tensor viewed as ``(B, K, n, P, G, d)`` (no copy)."""
    batch, heads, length, dim = folded.shape
    return folded.view(batch, kv_heads, n, heads // (kv_heads * n), length, dim).transpose(3, 4)


def _lse_per_query(lse: Tensor, kv_heads: int, n: int) -> Tensor:
    """The kernel's ``(B, K * n * G, P)`` log-sum-exp as ``(B, K, n, P, G)`` (a view)."""
    batch, heads, length = lse.shape
    return lse.view(batch, kv_heads, n, heads // (kv_heads * n), length).transpose(3, 4)


def _padded(tensor: Tensor, dim: int) -> Tensor:
    """``tensor`` with zeros appended to its last dimension up to ``dim`` (itself when it has that size)."""
    return torch.nn.functional.pad(tensor, (0, dim - tensor.shape[-1])) if tensor.shape[-1] < dim else tensor


def _text_lse(lse_text: Tensor, mask: TextMask, kv_heads: int, n: int) -> Tensor:
    """The kernel's log-sum-exp per query ``(B, K, n, P, G)``, ``-inf`` for queries that may read no text key."""
    return _lse_per_query(lse_text, kv_heads, n).masked_fill(~mask.reads_text, float("-inf"))


class FusedTwoPartAttention(torch.autograd.Function):
    """The same attention as :class:`~lightning_tokens.quiet_star.attention.TwoPartAttention` (no dropout), its text
    part in PyTorch's fused CPU kernel and its window read from a :class:`WindowBuffer`'s ``written()`` tensors
    (``window_keys, window_values (B, K, n, P, count, d)``) and a :class:`TextMask`; the window tensors after
    them are the same keys and values as separate inputs, which receive their gradients."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, text_key: Tensor, text_value: Tensor, mask: TextMask, scaling: float,
                window_keys: Tensor, window_values: Tensor, *window: Tensor) -> Tensor:
        batch, kv_heads = text_key.shape[:2]
        n = query.shape[0] // batch
        acc = torch.promote_types(query.dtype, torch.float32)
        dim = max(query.shape[-1], text_value.shape[-1])
        out_text, lse_text = _KERNEL(_padded(_fold(query, batch, kv_heads), dim), _padded(text_key, dim),
                                     _padded(text_value, dim), attn_mask=mask.additive, scale=scaling)
        out_text = out_text[..., :text_value.shape[-1]]
        q = _per_query(query, batch, kv_heads).to(acc)
        # one contiguous copy of the window: batched matmuls over strided blocks run several times slower
        keys, values = window_keys.to(acc).contiguous(), window_values.to(acc).contiguous()
        own = q @ keys.transpose(-1, -2) * scaling  # (B, K, n, P, G, count)
        text_lse = _text_lse(lse_text.to(acc), mask, kv_heads, n)
        lse = torch.logaddexp(text_lse, own.logsumexp(-1))
        text_share = torch.exp(text_lse - lse)[..., None]
        text_part = _folded_as_per_query(out_text, kv_heads, n).to(acc)
        out = torch.where(text_share > 0, text_share * text_part, 0.0)  # a row with no text key: no NaN from it
        out = out + torch.exp(own - lse[..., None]) @ values
        out = out.to(query.dtype)
        ctx.save_for_backward(query, text_key, text_value, out, lse_text, lse, window_keys, window_values)
        ctx.mask, ctx.scaling, ctx.count = mask, scaling, len(window) // 2
        return _from_per_query(out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        query, text_key, text_value, out, lse_text, lse, window_keys, window_values = ctx.saved_tensors
        mask = ctx.mask
        batch, kv_heads = text_key.shape[:2]
        n, scaling = query.shape[0] // batch, ctx.scaling
        acc = torch.promote_types(query.dtype, torch.float32)
        g = _per_query(grad_out, batch, kv_heads).to(acc)
        text_share = torch.exp(_text_lse(lse_text.to(acc), mask, kv_heads, n) - lse)[..., None]
        dim = max(query.shape[-1], text_value.shape[-1])
        dq_text, dk_text, dv_text = _KERNEL_BACKWARD(
            _padded(_refold(g * text_share, query.dtype), dim), _padded(_fold(query, batch, kv_heads), dim),
            _padded(text_key, dim), _padded(text_value, dim), _padded(_refold(out, query.dtype), dim), lse_text, 0.0,
            False, attn_mask=mask.additive, scale=scaling)
        key_dim, value_dim = text_key.shape[-1], text_value.shape[-1]
        dq_text, dk_text, dv_text = dq_text[..., :key_dim], dk_text[..., :key_dim], dv_text[..., :value_dim]
        q, o = _per_query(query, batch, kv_heads).to(acc), out.to(acc)
        keys, values = window_keys.to(acc).contiguous(), window_values.to(acc).contiguous()
        p_own = torch.exp(q @ keys.transpose(-1, -2) * scaling - lse[..., None])  # (B, K, n, P, G, count)
        delta = (g * o).sum(-1, keepdim=True)
        d_own = p_own * (g @ values.transpose(-1, -2) - delta)
        dq = _folded_as_per_query(dq_text, kv_heads, n).to(acc) + d_own @ keys * scaling
        dk_own = d_own.transpose(-1, -2) @ q * scaling  # (B, K, n, P, count, d)
        dv_own = p_own.transpose(-1, -2) @ g
        rows = query.shape[0]
        dk_window = [_window_grad(dk_own[..., p, :], rows, query.dtype) for p in range(ctx.count)]
        dv_window = [_window_grad(dv_own[..., p, :], rows, query.dtype) for p in range(ctx.count)]
        return (_from_per_query(dq.to(query.dtype)), dk_text, dv_text, None, None, None, None,
                *dk_window, *dv_window)


def _refold(per_query: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, K, n, P, G, d)`` as the kernel's folded ``(B, K * n * G, P, d)``."""
    batch, kv_heads, n, length, groups, dim = per_query.shape
    return per_query.transpose(3, 4).reshape(batch, kv_heads * n * groups, length, dim).to(dtype)


def _window_grad(grad: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """A window key's or value's gradient ``(B, K, n, P, d)`` as ``(B * n, K, P, d)``."""
    batch, kv_heads, n, length, dim = grad.shape
    return grad.transpose(1, 2).reshape(rows, kv_heads, length, dim).to(dtype)


def fused_two_part_attention(query: Tensor, text_key: Tensor, text_value: Tensor, allowed: Tensor,
                             window_keys: list[Tensor], window_values: list[Tensor], scaling: float,
                             buffer: Optional[WindowBuffer] = None, mask: Optional[TextMask] = None) -> Tensor:
    """:class:`FusedTwoPartAttention` (see :func:`~lightning_tokens.quiet_star.attention.two_part_attention` for the
    arguments). ``buffer`` holds the window as its last written passes; without one, it is built from the window.
    ``mask`` is ``allowed`` as the kernel takes it; without one, it is built."""
    if buffer is None:
        buffer = WindowBuffer.like(window_keys[0], window_values[0], text_key.shape[0], len(window_keys))
        for key, value in zip(window_keys, window_values):
            buffer.append(key, value)
    if mask is None:
        mask = TextMask.of(allowed, query.dtype)
    return FusedTwoPartAttention.apply(query, text_key, text_value, mask, float(scaling),
                                       *buffer.written(len(window_keys)), *window_keys, *window_values)
