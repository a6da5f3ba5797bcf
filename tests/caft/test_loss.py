"""head_losses: the chunked loss against the stacked computation, padding on either side, rows without targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.caft import capture_trunk, head_losses
from lightning_tokens.caft.loss import weighted_sum
from tests.caft.builders import batch, build, trunk_of
from tests.tiny import padded_rows


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Tiny models built from config carry denormal weights; CPU matmuls on them are ~1000x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def naive_head_losses(heads, model, trunk, labels, mask):
    """Every head's full (B, T, V) logits, shifted labels, mean CE: the stacked reference computation.

    Position t counts for head k when t is a real token and labels[t + 1 + k] is a real, labelled one."""
    losses, accuracies = [], []
    for k, logits in enumerate(heads(model, trunk, mask), start=1):
        shift = 1 + k
        flat = logits[:, :-shift].reshape(-1, logits.shape[-1])
        real = mask[:, :-shift].bool() & mask[:, shift:].bool()
        target = labels[:, shift:].masked_fill(~real, -100).reshape(-1)
        losses.append(F.cross_entropy(flat, target, ignore_index=-100))
        keep = target != -100
        accuracies.append((flat[keep].argmax(-1) == target[keep]).float().mean())
    return losses, accuracies


def pad_rows(rows, width, side):
    """Padded ids, their mask, and positions that skip the padding."""
    ids, mask = padded_rows(rows, width, side)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def caft_loss_and_grads(model, heads, ids, mask, positions, prompt, gamma=0.8):
    labels = ids.masked_fill(mask == 0, -100)
    first = mask.argmax(-1)  # first real token of each row
    for row, start in enumerate(first.tolist()):
        labels[row, start:start + prompt] = -100
    with capture_trunk(model) as holder:
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    losses = head_losses(heads, model, holder["trunk"], labels, mask, chunk_size=5)
    total = weighted_sum(losses, gamma)
    params = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)  # the last layer's own weights are unused
    return [item.loss for item in losses], [item.count for item in losses], grads


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_and_right_padding_give_the_same_head_losses_and_gradients(model_type, attn):
    # Prompts of 2 tokens, shorter than K = 4: left padding puts targets within reach of padding positions.
    model, heads = build(model_type, attn)
    model.train()
    heads.train()
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (12, 5, 9)]
    right_losses, right_counts, right_grads = caft_loss_and_grads(model, heads, *pad_rows(rows, 14, "right"), prompt=2)
    left_losses, left_counts, left_grads = caft_loss_and_grads(model, heads, *pad_rows(rows, 14, "left"), prompt=2)
    assert right_counts == left_counts and all(c > 0 for c in right_counts)
    for a, b in zip(right_losses, left_losses):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert sum(g is not None for g in right_grads) > len(right_grads) // 2
    for a, b in zip(right_grads, left_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_head_losses_of_a_left_padded_batch_ignore_later_tokens(model_type, attn):
    # Only targets before position 8; tokens from 8 on change. Left padding and prompts shorter than K.
    model, heads = build(model_type, attn)
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (12, 9, 11)]
    ids, mask, positions = pad_rows(rows, 12, "left")
    changed = ids.clone()
    changed[:, 8:] = torch.randint(5, 100, changed[:, 8:].shape, generator=g)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 8:] = -100
    with torch.no_grad():
        before = head_losses(heads, model, trunk_of(model, ids, mask)[0], labels, mask)
        after = head_losses(heads, model, trunk_of(model, changed, mask)[0], labels, mask)
    assert all(item.count > 0 for item in before)
    for a, b in zip(before, after):
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size,separate_unembedding", [(3, False), (4096, True)])
def test_chunked_loss_equals_stacked_computation_with_gradients(chunk_size, separate_unembedding):
    model, heads = build("llama", separate_unembedding=separate_unembedding)
    heads.train()
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask, labels = batch()
    trunk, _ = trunk_of(model, ids, mask)
    trunk.hidden = trunk.hidden.detach().requires_grad_(True)
    got = head_losses(heads, model, trunk, labels, mask, chunk_size=chunk_size)
    total = weighted_sum(got, 0.8)
    grads = torch.autograd.grad(total, [trunk.hidden, *heads.parameters()])
    want, accuracies = naive_head_losses(heads, model, trunk, labels, mask)
    expected = sum(0.8 ** k * loss for k, loss in enumerate(want, start=1))
    expected_grads = torch.autograd.grad(expected, [trunk.hidden, *heads.parameters()])
    torch.testing.assert_close(total, expected)
    for item, loss, acc in zip(got, want, accuracies):
        torch.testing.assert_close(item.loss, loss)
        torch.testing.assert_close(item.accuracy, acc)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_heads_without_targets_give_zero_loss_not_nan():
    model, heads = build("llama")
    ids, mask, labels = batch()
    labels[:, :] = -100
    labels[:, 1] = ids[:, 1]  # the only target is too close to the start for any head to reach
    trunk, _ = trunk_of(model, ids, mask)
    for item in head_losses(heads, model, trunk, labels, mask):
        assert item.count == 0 and item.loss == 0 and torch.isfinite(item.accuracy)
