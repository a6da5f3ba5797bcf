"""The two-part attention on PyTorch's fused CPU kernel: against dense attention when its window is the last passes of
a longer buffer, the buffer's capacity, the kernel's mask, and where the kernel applies."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.quiet_star.fused_attention import (
    TextMask,
    WindowBuffer,
    fused_kernel_applies,
    fused_two_part_attention,
)
from tests.quiet_star.naive import dense_reference


def test_a_window_of_the_last_passes_of_a_buffer_equals_dense_attention_over_them():
    """Three passes written, a window of the last two (a sliding-window layer): the first pass is not read, and the
    gradients of the query, the text and the two window passes are dense attention's."""
    generator = torch.Generator().manual_seed(0)
    batch, n, kv_heads, groups, length, key_dim, value_dim = 2, 2, 2, 2, 5, 4, 6

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    query = rand(batch * n, kv_heads * groups, length, key_dim)
    text_key, text_value = rand(batch, kv_heads, length, key_dim), rand(batch, kv_heads, length, value_dim)
    keys = [rand(batch * n, kv_heads, length, key_dim) for _ in range(3)]
    values = [rand(batch * n, kv_heads, length, value_dim) for _ in range(3)]
    allowed = torch.rand(batch, length, length, generator=generator) > 0.4
    allowed[1, 2] = False  # a query reading no text key: only its window counts
    buffer = WindowBuffer.like(keys[0], values[0], batch, capacity=3)
    for key, value in zip(keys, values):
        buffer.append(key, value)
    out = fused_two_part_attention(query, text_key, text_value, allowed, keys[1:], values[1:], 0.5, buffer=buffer)
    expected = dense_reference(query, text_key, text_value, allowed, keys[1:], values[1:], 0.5)
    everything = dense_reference(query, text_key, text_value, allowed, keys, values, 0.5)
    assert out.shape == (batch * n, kv_heads * groups, length, value_dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert (everything - expected).abs().max() > 1e-3  # reading the first pass too would show
    inputs = [query, text_key, text_value, keys[1], keys[2], values[1], values[2]]
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_buffer_refuses_a_pass_past_its_capacity():
    key = torch.zeros(4, 2, 3, 8)
    buffer = WindowBuffer.like(key, key, batch=2, capacity=2)
    buffer.append(key, key)
    buffer.append(key + 1, key + 1)
    written_keys, _ = buffer.written()
    assert written_keys.shape == (2, 2, 2, 3, 2, 8)
    assert torch.equal(written_keys[..., 1, :], torch.ones(2, 2, 2, 3, 8))
    with pytest.raises(RuntimeError, match="all 2 passes are written"):
        buffer.append(key, key)


def test_text_mask_is_additive_and_knows_the_queries_that_read_no_text():
    allowed = torch.tensor([[[True, False], [False, False]]])
    mask = TextMask.of(allowed, torch.float32)
    assert mask.additive.shape == (1, 1, 2, 2)
    assert mask.additive[0, 0].tolist() == [[0.0, float("-inf")], [float("-inf"), float("-inf")]]
    assert mask.reads_text.flatten().tolist() == [True, False]


def test_the_kernel_applies_on_the_cpu_without_dropout_only():
    query = torch.zeros(1, 1, 2, 4)
    assert fused_kernel_applies(query, 0.0)
    assert not fused_kernel_applies(query, 0.1)
    assert not fused_kernel_applies(query.to("meta"), 0.0)
