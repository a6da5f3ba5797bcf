"""Self-speculative decoding on sliding-window models past their window: the same tokens as greedy ``generate``."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.caft import MultiTokenHeads, generate_with_heads
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import padded_rows

WINDOW, MAX_NEW = 6, 30
PROMPTS = [[1, 7, 9, 11, 12], [1, 30, 40]]
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.2)  # wider than the default: a default tiny model repeats its last token forever
CASES = {
    # one sliding and one full layer: a mask per layer type; untied embeddings, or a tiny Gemma repeats a token forever
    "gemma2": dict(model_type="gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                   tie_word_embeddings=False),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
    # no layer_types: every layer slides, one mask
    "mistral": dict(model_type="mistral", sliding_window=WINDOW),
}


@pytest.mark.parametrize("case,attn", [("gemma2", "eager"), ("gemma3_text", "sdpa"), ("gemma3_text", "eager"),
                                       ("mistral", "sdpa")])
def test_speculative_decoding_past_the_sliding_window_equals_greedy_generate(case, attn):
    model, _ = load_causal_lm(ModelSpec(config={**SIZES, **CASES[case]}, attn_implementation=attn))
    model.eval()
    heads = MultiTokenHeads(model, num_heads=3, architecture="layer").eval()
    with torch.no_grad():  # imperfect drafts: rows keep different numbers of them, so their slots hold gaps
        for p in heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids, mask = padded_rows(PROMPTS, 5, "left")
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    got, stats = generate_with_heads(model, heads, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=0)
    assert got.tolist() == reference.tolist()
    assert 0 < stats.accepted < stats.drafted  # not vacuous: some drafts kept, some rejected ...
    # ... and not as many by each row: a row's rejected slots then lie between its tokens
    assert stats.row_accepted[0] != stats.row_accepted[1]
    # the window matters: a row that attended to every earlier token would decode otherwise
    config = model.config.get_text_config()
    config.sliding_window = 10_000
    try:
        unwindowed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)
    finally:
        config.sliding_window = WINDOW
    assert unwindowed.tolist() != reference.tolist()


def test_speculative_decoding_refuses_chunked_attention_layers():
    # transformers gives this config chunked cache layers (as Llama 4's); the heads cannot be built on Llama 4 itself
    model, _ = load_causal_lm(ModelSpec(config={**SIZES, "model_type": "llama", "attention_chunk_size": 4}))
    heads = MultiTokenHeads(model, num_heads=2, architecture="resblock")
    with pytest.raises(ValueError, match="chunked_attention"):
        generate_with_heads(model, heads, torch.tensor([[1, 5, 6]]), max_new_tokens=3)
