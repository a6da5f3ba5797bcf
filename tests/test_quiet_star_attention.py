"""The thought passes' attention (text keys held once, plus each position's own window) against dense attention.

Two references, both independent of :mod:`lightning_tokens.quiet_star.attention`:

- plain softmax attention over ``[text keys | every pass's keys]`` with the mask ``[text mask | I | ... | I]``;
- the thought passes as they ran before it: one growing ``DynamicCache`` and 4D additive masks, the whole model
  attending through transformers' own attention.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import padded_rows, tiny_config
from lightning_tokens import QuietSTaRModule
from lightning_tokens.modeling import ModelSpec, cache_keyword, decoder_of
from lightning_tokens.quiet_star import module as thoughts_module
from lightning_tokens.quiet_star import parallel
from lightning_tokens.quiet_star.attention import two_part_attention


def dense_reference(query, text_key, text_value, allowed, keys, values, scaling, softcap=None):
    """Softmax attention over every key at once, key/value heads repeated for the query heads (scores soft-capped
    as ``softcap * tanh(scores / softcap)`` before the mask where ``softcap`` is given)."""
    rows, heads, length, _ = query.shape
    n, groups = rows // text_key.shape[0], heads // text_key.shape[1]

    def expand(tensor, repeat_rows):
        tensor = tensor.repeat_interleave(repeat_rows, 0) if repeat_rows > 1 else tensor
        return tensor.repeat_interleave(groups, 1)

    all_keys = torch.cat([expand(text_key, n)] + [expand(k, 1) for k in keys], 2)
    all_values = torch.cat([expand(text_value, n)] + [expand(v, 1) for v in values], 2)
    eye = torch.eye(length, dtype=torch.bool).expand(rows, length, length)
    mask = torch.cat([allowed.repeat_interleave(n, 0)] + [eye] * len(keys), -1)[:, None]
    scores = query @ all_keys.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ all_values


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


# -- the whole passes against the growing-cache implementation they replace ------------------------------------
def cached_parallel_thoughts(lm, input_ids, attention_mask, start_embedding, end_embedding, forbidden_ids,
                             n_thoughts, thought_length, n_ahead_talk, temperature=1.0, pad_token_id=0,
                             generator=None, position_ids=None, think_at="all", candidates=None):
    """The passes on one DynamicCache that grows by ``L`` keys per pass, with 4D masks ``[text | I | ... | I]``; a
    layer of sliding window ``W`` reads, from the query at pass ``k`` and position ``i`` (index ``i + k`` of the
    sequence it stands for), the text keys ``j > i + k - W`` and the keys of passes ``p > k - W`` (one mask per
    layer type where the model lists ``config.layer_types``)."""
    assert think_at == "all"  # every position thinks here
    backbone, head, embed = decoder_of(lm), lm.get_output_embeddings(), lm.get_input_embeddings()
    batch, length = input_ids.shape
    n = n_thoughts
    segments = None if position_ids is None else parallel.segment_ids(position_ids)
    positions = parallel.positions_of(attention_mask) if position_ids is None else position_ids
    allowed = parallel.text_mask(attention_mask, segments=segments)
    embeds = embed(input_ids)
    dtype = embeds.dtype
    cache = DynamicCache()
    kinds = getattr(lm.config.get_text_config(decoder=True), "layer_types", None)
    windows = dict(zip(kinds or [None], parallel.layer_windows(lm)))
    index = torch.arange(length)

    def step(inputs, mask, position_ids, pass_index=0):
        def additive(window):
            reach = mask
            if window is not None:
                parts = [index[:, None] + pass_index - index < window]
                parts += [torch.full((length, length), pass_index - p < window) for p in range(1, pass_index + 1)]
                reach = mask & torch.cat(parts, -1)
            return torch.where(reach, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)[:, None]

        masks = {kind: additive(window) for kind, window in windows.items()}
        return backbone(inputs_embeds=inputs, attention_mask=masks if kinds else masks[None], position_ids=position_ids,
                        use_cache=True, **{cache_keyword(backbone): cache}).last_hidden_state

    base_hidden = step(embeds, allowed, positions)
    cache.batch_repeat_interleave(n)
    allowed, positions = allowed.repeat_interleave(n, 0), positions.repeat_interleave(n, 0)
    eye = torch.eye(length, dtype=torch.bool).expand(batch * n, length, length)

    def thought_step(inputs, pass_index):
        return step(inputs, torch.cat([allowed, *([eye] * pass_index)], -1), positions + pass_index, pass_index)

    rows, thought_hidden, tokens = batch * n, [], []
    inputs = start_embedding.to(dtype).expand(rows, length, -1)
    for pass_index in range(1, thought_length + 2):
        hidden = thought_step(inputs, pass_index)
        if pass_index > thought_length:
            break
        thought_hidden.append(hidden)
        with torch.no_grad():
            token = parallel.sample_tokens(parallel.forbid(head(hidden), forbidden_ids), temperature, generator)
        tokens.append(token)
        inputs = embed(token)
    pass_index = thought_length + 2
    talk_hidden = [thought_step(end_embedding.to(dtype).expand(rows, length, -1), pass_index)]
    repeated = input_ids.repeat_interleave(n, 0)
    for shift in range(1, n_ahead_talk):
        shifted = torch.nn.functional.pad(repeated[:, shift:], (0, shift), value=pad_token_id)
        talk_hidden.append(thought_step(embed(shifted), pass_index + shift))
    return parallel.ThoughtPasses(base_hidden, thought_hidden, torch.stack(tokens, -1), talk_hidden,
                                  attention_mask, segments)


def loss_and_gradients(module, batch):
    module.zero_grad()
    out = module.quiet_star(*batch, temperature=0.0)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_equal_to_the_growing_cache(monkeypatch, module, batch, loss_atol=1e-10, gradient_tolerance=None):
    """The parallel passes' loss parts and gradients against :func:`cached_parallel_thoughts` on ``batch``: loss parts
    within ``loss_atol``, each gradient within ``gradient_tolerance(expected)`` (default rtol 1e-7, atol 1e-9).
    Returns the growing cache's gradients, for a caller to check which parameters have one."""
    out, grads = loss_and_gradients(module, batch)
    monkeypatch.setattr(thoughts_module, "parallel_thoughts", cached_parallel_thoughts)
    expected, expected_grads = loss_and_gradients(module, batch)
    assert out.mixed_nll > 0 and expected_grads
    for name in ("loss", "base_nll", "mixed_nll", "policy_loss", "reward"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=loss_atol, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, value in expected_grads.items():
        tolerance = gradient_tolerance(value) if gradient_tolerance else dict(rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(grads[name], value, **tolerance, msg=name)
    return expected_grads


@pytest.mark.parametrize("n_thoughts", [1, 2])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
def test_passes_give_the_loss_and_gradients_of_the_growing_cache(monkeypatch, model_type, side, n_thoughts):
    no_dropout = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0) if model_type == "gpt2" else {}
    spec = ModelSpec(config=tiny_config(model_type, **no_dropout), dtype="float64")  # comparable in training mode
    module = QuietSTaRModule(spec, thought_length=3, n_ahead_talk=3, n_thoughts=n_thoughts, policy_weight=1.0)
    torch.manual_seed(1)
    with torch.no_grad():  # a mixing head that mixes, so every part of the loss has a gradient
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    module = module.double()
    g = torch.Generator().manual_seed(5)
    batch = padded_rows([torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 4, 7)], 10, side)
    assert_equal_to_the_growing_cache(monkeypatch, module, batch)


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
