"""CAFT heads: construction per architecture, causality, the chunked loss, schedules, saving, speculative decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import padded_rows, tiny_config
from lightning_tokens.caft import MultiTokenHeads, capture_trunk, generate_with_heads, head_losses, schedule_value
from lightning_tokens.caft.loss import weighted_sum
from lightning_tokens.modeling import ModelSpec, load_causal_lm


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Tiny models built from config carry denormal weights; CPU matmuls on them are ~1000x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def build(model_type="llama", attn="sdpa", **heads_kwargs):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type), attn_implementation=attn))
    model.eval()
    return model, MultiTokenHeads(model, **heads_kwargs).eval()


def batch(vocab=100, length=14):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def trunk_of(model, ids, mask):
    with capture_trunk(model) as holder:
        logits = model(input_ids=ids, attention_mask=mask).logits
    return holder["trunk"], logits


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fresh_layer_heads_reproduce_the_main_head(model_type, attn):
    # A head initialised as a copy of the last layer, fed that layer's input, then the final norm and lm_head,
    # must give the model's own logits: checks the trunk, the mask and the rotary embeddings together.
    model, heads = build(model_type, attn)
    ids, mask, _ = batch()
    trunk, logits = trunk_of(model, ids, mask)
    real = mask.bool()
    real[2] = False  # left-padded rows: the model's own mask gives padded queries garbage; compare the others
    real[2, 3:] = True
    for head_logits in heads(model, trunk, mask):
        torch.testing.assert_close(head_logits[real], logits[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,attn,architecture", [
    ("llama", "eager", "layer"), ("llama", "sdpa", "layer"), ("gpt2", "eager", "layer"), ("gpt2", "sdpa", "layer"),
    ("qwen2", "sdpa", "layer"), ("qwen2", "eager", "resblock"),
])
def test_changing_a_later_token_leaves_earlier_head_logits_unchanged(model_type, attn, architecture):
    model, heads = build(model_type, attn, architecture=architecture)
    with torch.no_grad():  # make the heads differ from the last layer, so they are tested on their own
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask, _ = batch()
    changed = ids.clone()
    changed[:, 9] = 4
    before = heads(model, trunk_of(model, ids, mask)[0], mask)
    after = heads(model, trunk_of(model, changed, mask)[0], mask)
    early = mask.bool().clone()
    early[:, 9:] = False
    for a, b in zip(before, after):
        torch.testing.assert_close(a[early], b[early], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, 9:], b[:, 9:])


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


def test_resblock_starts_as_identity_and_layer_heads_copy_the_last_layer():
    model, heads = build("llama", architecture="resblock", num_heads=2)
    assert all(torch.count_nonzero(b.linear.weight) == 0 for b in heads.blocks)
    model, heads = build("llama")
    last = model.model.layers[-1]
    for block in heads.blocks:
        for (name, a), (_, b) in zip(block.named_parameters(), last.named_parameters()):
            assert torch.equal(a, b), name
            assert a.data_ptr() != b.data_ptr()


def test_schedule_values():
    for p in [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]:
        assert schedule_value("rsine", p) == pytest.approx(math.sin(math.pi / 2 * (1 - p)))
        assert schedule_value("sine", p) == pytest.approx(math.sin(math.pi / 2 * p))
        assert schedule_value("linear", p) == pytest.approx(p)
        assert schedule_value("constant", p) == 1.0
        expected = math.sin(math.pi / 2 * p / 0.3) if p < 0.3 else 1.0
        assert schedule_value("sine_r", p, sine_ratio=0.3) == pytest.approx(expected)
        assert schedule_value("sine_0.3", p) == pytest.approx(expected)
    assert schedule_value("rsine", 0.0) == 1.0 and schedule_value("rsine", 1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        schedule_value("cosine", 0.5)
    with pytest.raises(ValueError, match="sine_ratio"):
        schedule_value("sine_r", 0.5, sine_ratio=0.0)


def test_save_and_load_round_trip_and_mismatches(tmp_path):
    model, heads = build("llama", num_heads=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    heads.save(tmp_path / "heads")
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["heads.safetensors", "heads_config.json"]
    loaded = MultiTokenHeads.load(tmp_path / "heads", model)
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    wider, _ = load_causal_lm(ModelSpec(config=tiny_config("llama", intermediate_size=96)))
    with pytest.raises(ValueError, match=r"mlp.*shape"):
        MultiTokenHeads.load(tmp_path / "heads", wider)
    gpt2, _ = load_causal_lm(ModelSpec(config=tiny_config("gpt2")))
    with pytest.raises(ValueError, match="missing keys"):
        MultiTokenHeads.load(tmp_path / "heads", gpt2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultiTokenHeads.load(tmp_path / "nowhere", model)


def test_bad_arguments_name_the_field():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("llama")))
    with pytest.raises(ValueError, match="num_heads"):
        MultiTokenHeads(model, num_heads=0)
    with pytest.raises(ValueError, match="architecture"):
        MultiTokenHeads(model, architecture="mlp")


@pytest.mark.parametrize("model_type,architecture", [("llama", "layer"), ("gpt2", "layer"), ("qwen2", "resblock")])
def test_speculative_decoding_equals_greedy_generate(model_type, architecture):
    model, heads = build(model_type, architecture=architecture)
    with torch.no_grad():  # imperfect drafts, so that both acceptance and rejection happen
        for p in heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for prompt in ([1, 7, 9, 11], [1, 30, 2, 2, 40, 41]):
        ids = torch.tensor([prompt])
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        got, stats = generate_with_heads(model, heads, ids, max_new_tokens=16, eos_token_id=[])
        assert torch.equal(got, reference)
        assert stats.new_tokens == 16 and 0 <= stats.acceptance_rate <= 1
        # each forward adds its accepted drafts + 1 (the last one may overshoot the budget by one)
        assert stats.accepted + stats.forwards - 1 <= stats.new_tokens <= stats.accepted + stats.forwards


def test_speculative_decoding_with_fewer_drafts_is_still_exact():
    model, heads = build("llama", num_heads=3)
    ids = torch.tensor([[1, 7, 9, 11]])
    reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    got, stats = generate_with_heads(model, heads, ids, max_new_tokens=12, eos_token_id=[], num_draft=1)
    assert torch.equal(got, reference) and stats.drafted <= stats.forwards
    with pytest.raises(ValueError, match="num_draft"):
        generate_with_heads(model, heads, ids, num_draft=4)


def test_speculative_decoding_stops_at_eos_like_generate():
    model, heads = build("llama")
    ids = torch.tensor([[0, 0, 1, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    reference = model.generate(input_ids=ids[:, 2:], max_new_tokens=30, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    eos = int(reference[0, 3 + 5])  # a token the model emits: it must stop right after its first occurrence
    first = (reference[0, 3:] == eos).nonzero()[0, 0].item()
    got, stats = generate_with_heads(model, heads, ids, mask, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(got, reference[:, : 3 + first + 1])
    with pytest.raises(ValueError, match="shape"):
        generate_with_heads(model, heads, torch.ones(3, dtype=torch.long))
