"""The thought passes' two-part attention on PyTorch's fused CPU attention kernel.

The text part (every thought query against the text's keys, the long part) runs in the kernel PyTorch's own
scaled-dot-product attention uses on the CPU, which also returns each query's log-sum-exp; the window part (at most
``thought_length + n_ahead_talk + 1`` keys per query) is a small einsum; the two merge exactly by their log-sum-exps,
as split-key (flash-decoding) attention does. The kernel reads grouped-query keys without repeating them, and the
``n`` thoughts of a row become ``n`` times the query heads of one text row, so the text's keys are read, not copied.

Backward: the kernel's own backward gets the output gradient scaled by the text part's share of the softmax
(``exp(lse_text - lse)``) and the merged output, so its ``rowsum(dO * O)`` term is the merged softmax's; the window
part's gradients follow from the same formulas in einsum.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_KERNEL_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def fused_kernel_applies(query: Tensor, dropout: float) -> bool:
    """Whether :class:`FusedTwoPartAttention` runs here: a CPU tensor, no attention dropout (its masks could not be
    drawn again in the backward) and a PyTorch that has the kernel."""
    return query.device.type == "cpu" and not dropout and _KERNEL is not None and _KERNEL_BACKWARD is not None


def _fold(query: Tensor, batch: int, kv_heads: int) -> Tensor:
    """``(B * n, K * G, P, d)`` queries as ``(B, K * n * G, P, d)``: a text row's thoughts as more heads, grouped by
    kv head (head ``k * n * G + t * G + g`` reads kv head ``k``)."""
    rows, heads, length, dim = query.shape
    n, groups = rows // batch, heads // kv_heads
    grouped = query.view(batch, n, kv_heads, groups, length, dim).transpose(1, 2)
    return grouped.reshape(batch, kv_heads * n * groups, length, dim)


def _unfold(folded: Tensor, rows: int, kv_heads: int) -> Tensor:
    """The inverse of :func:`_fold`."""
    batch, _, length, dim = folded.shape
    n = rows // batch
    groups = folded.shape[1] // (kv_heads * n)
    return folded.view(batch, kv_heads, n, groups, length, dim).transpose(1, 2).reshape(rows, kv_heads * groups,
                                                                                        length, dim)


def _stacked(window: tuple[Tensor, ...], batch: int) -> Tensor:
    """Window keys or values ``(B * n, K, P, d)`` each, as ``(count, B, K, n, P, d)``."""
    stacked = torch.stack(window)
    count, rows, kv_heads, length, dim = stacked.shape
    return stacked.view(count, batch, rows // batch, kv_heads, length, dim).transpose(2, 3)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, 1, P, L)`` 0 where allowed, ``-inf`` elsewhere (the kernel takes a mask of the query's dtype)."""
    return torch.where(allowed[:, None], 0.0, float("-inf")).to(dtype)


class FusedTwoPartAttention(torch.autograd.Function):
    """The same attention as :class:`~lightning_tokens.thoughts.attention.TwoPartAttention` (same arguments and
    shapes; ``dropout`` must be 0), its text part in PyTorch's fused CPU kernel."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, text_key: Tensor, text_value: Tensor, allowed: Tensor, scaling: float,
                *window: Tensor) -> Tensor:
        batch, kv_heads = text_key.shape[:2]
        count = len(window) // 2
        folded = _fold(query, batch, kv_heads)
        out_text, lse_text = _KERNEL(folded, text_key, text_value, attn_mask=_additive(allowed, query.dtype),
                                     scale=scaling)
        out, lse = _merge(folded, out_text, _text_lse(lse_text, allowed), _stacked(window[:count], batch),
                          _stacked(window[count:], batch), kv_heads, scaling)
        ctx.save_for_backward(query, text_key, text_value, allowed, out, lse_text, lse, *window)
        ctx.scaling, ctx.count = scaling, count
        return _unfold(out, query.shape[0], kv_heads)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        query, text_key, text_value, allowed, out, lse_text, lse, *window = ctx.saved_tensors
        batch, kv_heads = text_key.shape[:2]
        scaling, count = ctx.scaling, ctx.count
        folded, grad = _fold(query, batch, kv_heads), _fold(grad_out, batch, kv_heads)
        acc = torch.promote_types(query.dtype, torch.float32)
        text_share = torch.exp(_text_lse(lse_text, allowed).to(acc) - lse)[..., None]
        dq, dk_text, dv_text = _KERNEL_BACKWARD((grad.to(acc) * text_share).to(query.dtype), folded, text_key,
                                                text_value, out, lse_text, 0.0, False,
                                                attn_mask=_additive(allowed, query.dtype), scale=scaling)
        keys, values = _stacked(tuple(window[:count]), batch).to(acc), _stacked(tuple(window[count:]), batch).to(acc)
        q, g, o = (_heads_by_thought(t.to(acc), kv_heads, keys.shape[3]) for t in (folded, grad, out))
        p_own = torch.exp(torch.einsum("bkngcd,pbkncd->bkngcp", q, keys) * scaling - lse.view(*q.shape[:-1], 1))
        delta = (g * o).sum(-1, keepdim=True)
        d_own = p_own * (torch.einsum("bkngcd,pbkncd->bkngcp", g, values) - delta)
        dq_own = torch.einsum("bkngcp,pbkncd->bkngcd", d_own, keys) * scaling
        dk_own = torch.einsum("bkngcp,bkngcd->pbkncd", d_own, q) * scaling
        dv_own = torch.einsum("bkngcp,bkngcd->pbkncd", p_own, g)
        dq = (dq.to(acc) + dq_own.flatten(1, 3)).to(query.dtype)
        rows = query.shape[0]
        dk_window = [_window_grad(d, rows, key.dtype) for d, key in zip(dk_own.unbind(0), window[:count])]
        dv_window = [_window_grad(d, rows, value.dtype) for d, value in zip(dv_own.unbind(0), window[count:])]
        return (_unfold(dq, rows, kv_heads), dk_text, dv_text, None, None, *dk_window, *dv_window)


def _text_lse(lse_text: Tensor, allowed: Tensor) -> Tensor:
    """The kernel's log-sum-exp ``(B, heads, P)``, ``-inf`` for queries that may read no text key (the kernel gives
    such a row a finite one; only its window then counts)."""
    return lse_text.masked_fill(~allowed.any(-1)[:, None], float("-inf"))


def _heads_by_thought(folded: Tensor, kv_heads: int, n: int) -> Tensor:
    """``(B, K * n * G, P, d)`` as ``(B, K, n, G, P, d)``."""
    batch, heads, length, dim = folded.shape
    return folded.view(batch, kv_heads, n, heads // (kv_heads * n), length, dim)


def _window_grad(grad: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """A window key's or value's gradient ``(B, K, n, P, d)`` as ``(B * n, K, P, d)``."""
    batch, kv_heads, n, length, dim = grad.shape
    return grad.transpose(1, 2).reshape(rows, kv_heads, length, dim).to(dtype)


def _merge(folded: Tensor, out_text: Tensor, lse_text: Tensor, keys: Tensor, values: Tensor, kv_heads: int,
           scaling: float) -> tuple[Tensor, Tensor]:
    """The text part's output and log-sum-exp merged with the window's: ``(out (B, K * n * G, P, d), lse (B, K * n * G,
    P))``, the output in the query's dtype, the log-sum-exp in float32 (float64 for float64 inputs)."""
    acc = torch.promote_types(folded.dtype, torch.float32)
    n = keys.shape[3]
    q = _heads_by_thought(folded.to(acc), kv_heads, n)
    own = torch.einsum("bkngcd,pbkncd->bkngcp", q, keys.to(acc)) * scaling
    lse_text = lse_text.to(acc).view(own.shape[:-1])
    lse = torch.logaddexp(lse_text, own.logsumexp(-1))
    text_share = torch.exp(lse_text - lse)[..., None]
    text_part = torch.where(text_share > 0, text_share * _heads_by_thought(out_text.to(acc), kv_heads, n), 0.0)
    own_part = torch.einsum("bkngcp,pbkncd->bkngcd", torch.exp(own - lse[..., None]), values.to(acc))
    return (text_part + own_part).flatten(1, 3).to(folded.dtype), lse.flatten(1, 3)


def fused_two_part_attention(query: Tensor, text_key: Tensor, text_value: Tensor, allowed: Tensor,
                             window_keys: list[Tensor], window_values: list[Tensor], scaling: float,
                             dropout: Optional[float] = 0.0) -> Tensor:
    """:class:`FusedTwoPartAttention` on ``(query, text_key, text_value, allowed, window...)`` (see
    :func:`~lightning_tokens.thoughts.attention.two_part_attention`)."""
    if dropout:
        raise ValueError("fused_two_part_attention takes no attention dropout")
    return FusedTwoPartAttention.apply(query, text_key, text_value, allowed, float(scaling), *window_keys,
                                       *window_values)
