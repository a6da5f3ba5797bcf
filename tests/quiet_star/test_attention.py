"""The thought passes' attention (text keys held once, plus each position's own window) against dense attention
(:func:`tests.quiet_star.naive.dense_reference`): both paths (einsum chunks and the fused CPU kernel), soft-capped
scores, value heads of their own size, and dropout's gradient."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.quiet_star.attention import two_part_attention
from tests.quiet_star.naive import dense_reference


@pytest.mark.parametrize("chunk,fused", [(1, False), (3, False), (64, False), (64, True)])
@pytest.mark.parametrize("kv_heads,groups,n,passes", [(2, 3, 2, 3), (1, 1, 1, 1), (4, 1, 2, 2)])
def test_two_part_attention_equals_dense_attention_and_its_gradients(chunk, fused, kv_heads, groups, n, passes):
    """Both paths: the einsum chunks (any device, dropout) and PyTorch's fused CPU kernel for the text part."""
    generator = torch.Generator().manual_seed(kv_heads * 10 + passes)
    batch, length, dim = 2, 7, 4

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    query = rand(batch * n, kv_heads * groups, length, dim)
    text_key, text_value = rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim)
    keys = [rand(batch * n, kv_heads, length, dim) for _ in range(passes)]
    values = [rand(batch * n, kv_heads, length, dim) for _ in range(passes)]
    allowed = torch.rand(batch, length, length, generator=generator) > 0.4
    allowed[0, 2] = False  # a query reading no text key at all: its own window still holds its own key
    inputs = [query, text_key, text_value, *keys, *values]
    out = two_part_attention(query, text_key, text_value, allowed, keys, values, 0.5, chunk, fused=fused)
    expected = dense_reference(query, text_key, text_value, allowed, keys, values, 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_two_part_attention_keeps_the_dtype_and_needs_a_window():
    query = torch.randn(2, 2, 3, 4, dtype=torch.bfloat16)
    key = torch.randn(2, 2, 3, 4, dtype=torch.bfloat16)
    allowed = torch.ones(2, 3, 3, dtype=torch.bool)
    assert two_part_attention(query, key, key, allowed, [key], [key], 0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="at least one"):
        two_part_attention(query, key, key, allowed, [], [], 0.5)


def test_attention_dropout_has_the_gradient_of_its_own_forward():
    """With dropout the masks are drawn again in the backward from the same seed: the analytic gradient is that of
    the forward (numerical check), and dropout does change the output."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    query, text_key, text_value = rand(4, 4, 5, 3), rand(2, 2, 5, 3), rand(2, 2, 5, 3)
    keys, values = [rand(4, 2, 5, 3), rand(4, 2, 5, 3)], [rand(4, 2, 5, 3), rand(4, 2, 5, 3)]
    allowed = torch.tril(torch.ones(5, 5, dtype=torch.bool)).expand(2, 5, 5)

    def attend(query, text_key, text_value, k1, k2, v1, v2, dropout=0.3):
        return two_part_attention(query, text_key, text_value, allowed, [k1, k2], [v1, v2], 0.7, chunk=2,
                                  dropout=dropout, generator=torch.Generator().manual_seed(1))

    inputs = (query, text_key, text_value, *keys, *values)
    assert torch.autograd.gradcheck(attend, inputs)
    plain = attend(*inputs, dropout=0.0)
    torch.testing.assert_close(plain, dense_reference(query, text_key, text_value, allowed, keys, values, 0.7))
    assert not torch.allclose(attend(*inputs), plain)


@pytest.mark.parametrize("fused", [False, True])
def test_soft_capped_two_part_attention_equals_dense_attention_and_its_gradients(fused):
    generator = torch.Generator().manual_seed(2)
    batch, n, kv_heads, groups, length, dim = 2, 2, 2, 2, 6, 4

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    query = rand(batch * n, kv_heads * groups, length, dim, scale=3.0)
    text_key, text_value = rand(batch, kv_heads, length, dim, scale=3.0), rand(batch, kv_heads, length, dim)
    keys = [rand(batch * n, kv_heads, length, dim, scale=3.0) for _ in range(2)]
    values = [rand(batch * n, kv_heads, length, dim) for _ in range(2)]
    allowed = torch.rand(batch, length, length, generator=generator) > 0.4
    allowed[1, 3] = False  # a query reading no text key
    inputs = [query, text_key, text_value, *keys, *values]
    out = two_part_attention(query, text_key, text_value, allowed, keys, values, 0.5, chunk=4, fused=fused, softcap=2.0)
    expected = dense_reference(query, text_key, text_value, allowed, keys, values, 0.5, softcap=2.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    uncapped = dense_reference(query, text_key, text_value, allowed, keys, values, 0.5)
    assert (uncapped - expected).abs().max() > 0.1, "scores too small for the cap to matter"
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("key_dim,value_dim", [(6, 4), (4, 7)])
def test_two_part_attention_with_value_heads_of_their_own_size(fused, key_dim, value_dim):
    generator = torch.Generator().manual_seed(key_dim * 10 + value_dim)
    batch, n, kv_heads, groups, length = 2, 2, 2, 2, 6

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    query = rand(batch * n, kv_heads * groups, length, key_dim)
    text_key, text_value = rand(batch, kv_heads, length, key_dim), rand(batch, kv_heads, length, value_dim)
    keys = [rand(batch * n, kv_heads, length, key_dim) for _ in range(2)]
    values = [rand(batch * n, kv_heads, length, value_dim) for _ in range(2)]
    allowed = torch.rand(batch, length, length, generator=generator) > 0.4
    allowed[1, 3] = False  # a query reading no text key
    inputs = [query, text_key, text_value, *keys, *values]
    out = two_part_attention(query, text_key, text_value, allowed, keys, values, 0.3, chunk=4, fused=fused)
    expected = dense_reference(query, text_key, text_value, allowed, keys, values, 0.3)
    assert out.shape == (batch * n, kv_heads * groups, length, value_dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
