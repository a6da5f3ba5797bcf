"""Batched self-speculative decoding: row by row the same tokens as transformers' greedy ``generate``."""

from __future__ import annotations

import pytest
import torch

from conftest import padded_rows, tiny_config
from lightning_tokens.caft import MultiTokenHeads, generate_with_heads
from lightning_tokens.modeling import ModelSpec, load_causal_lm

PROMPTS = [[1, 7, 9, 11], [1, 30, 2, 2, 40, 41], [5, 6]]
MAX_NEW = 14


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Tiny models built from config carry denormal weights; CPU matmuls on them are ~1000x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def noisy_heads(model_type, architecture, attn="sdpa"):
    # a wider initialisation than the default: a default tiny model repeats its last prompt token forever
    config = tiny_config(model_type, initializer_range=0.2)
    model, _ = load_causal_lm(ModelSpec(config=config, attn_implementation=attn))
    model.eval()
    heads = MultiTokenHeads(model, num_heads=3, architecture=architecture).eval()
    with torch.no_grad():  # imperfect drafts, so that both acceptance and rejection happen
        for p in heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, heads


def greedy(model, ids, mask, eos):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                          pad_token_id=0, eos_token_id=eos)


def early_eos(model, ids, mask):
    """A token that one row first emits after a few tokens and no other row emits at all, and that row."""
    free = greedy(model, ids, mask, None)[:, ids.shape[1]:]
    for b, row in enumerate(free.tolist()):
        others = set(free[[i for i in range(free.shape[0]) if i != b]].flatten().tolist())
        for i in range(3, MAX_NEW // 2):
            if row[i] not in others and row[i] not in row[:i] and row[i] != 0:
                return row[i], b
    raise AssertionError("no token ends exactly one row early; change the prompts")


@pytest.mark.parametrize("model_type,architecture,attn", [("llama", "layer", "sdpa"), ("llama", "resblock", "sdpa"),
                                                          ("llama", "layer", "eager"), ("qwen2", "layer", "sdpa"),
                                                          ("gpt2", "layer", "sdpa")])
def test_batched_speculative_decoding_equals_batched_greedy_generate(model_type, architecture, attn):
    model, heads = noisy_heads(model_type, architecture, attn)
    ids, mask = padded_rows(PROMPTS, 6, "left")
    eos, early_row = early_eos(model, ids, mask)
    reference = greedy(model, ids, mask, eos)
    got, stats = generate_with_heads(model, heads, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                     pad_token_id=0)
    assert torch.equal(got, reference)
    assert 0 < stats.accepted < stats.drafted  # not vacuous: some drafts kept, some rejected
    assert stats.row_new_tokens[early_row] < MAX_NEW
    assert [n for b, n in enumerate(stats.row_new_tokens) if b != early_row] == [MAX_NEW] * 2
    assert stats.new_tokens == sum(stats.row_new_tokens)
    assert stats.drafted == sum(stats.row_drafted) and stats.accepted == sum(stats.row_accepted)
    assert stats.row_forwards[early_row] < stats.forwards == max(stats.row_forwards)
    # every row decodes as it would alone: same tokens, same drafts accepted
    for b in range(len(PROMPTS)):
        alone, row_stats = generate_with_heads(model, heads, ids[b: b + 1], mask[b: b + 1], max_new_tokens=MAX_NEW,
                                               eos_token_id=eos)
        new = got[b, ids.shape[1]: ids.shape[1] + stats.row_new_tokens[b]]
        assert torch.equal(alone[0], torch.cat([torch.tensor(PROMPTS[b]), new]))
        assert (row_stats.drafted, row_stats.accepted) == (stats.row_drafted[b], stats.row_accepted[b])
        assert row_stats.forwards == stats.row_forwards[b]
    assert stats.row_acceptance_rate[early_row] == stats.row_accepted[early_row] / stats.row_drafted[early_row]
    assert stats.tokens_per_forward == stats.new_tokens / stats.forwards


def test_batched_speculative_decoding_with_one_draft_and_no_eos():
    model, heads = noisy_heads("gpt2", "layer")
    ids, mask = padded_rows(PROMPTS, 7, "left")  # a column of padding in every row is dropped
    reference = greedy(model, ids[:, 1:], mask[:, 1:], None)
    got, stats = generate_with_heads(model, heads, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[], num_draft=1)
    assert torch.equal(got, reference)
    assert stats.row_new_tokens == [MAX_NEW] * 3 and stats.drafted <= 3 * stats.forwards


def test_batched_speculative_decoding_rejects_right_padding():
    model, heads = noisy_heads("llama", "resblock")
    ids, mask = padded_rows(PROMPTS, 6, "right")
    with pytest.raises(ValueError, match="left padding"):
        generate_with_heads(model, heads, ids, mask)
