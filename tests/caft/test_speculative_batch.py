"""generate_with_heads on a batch: row by row the same tokens as transformers' greedy ``generate``."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.caft import generate_with_heads
from tests.caft.speculative_cases import MAX_NEW, PROMPTS, early_eos, greedy, noisy_heads
from tests.tiny import padded_rows


@pytest.fixture(autouse=True)
def _flush_denormals():
    # Tiny models built from config carry denormal weights; CPU matmuls on them are ~1000x slower.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


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
