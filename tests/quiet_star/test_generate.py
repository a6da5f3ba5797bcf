"""Thoughtful generation against a naive re-computation from full sequences and against the DynamicCache decoder it
replaced (llama, qwen2, mistral, gpt2), batch > 1, delimiters never emitted, the cache allocated once."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule
from tests.quiet_star.naive import THOUGHT_LENGTH, assert_generate_equals_naive
from tests.tiny import padded_rows, tiny_config


def make_module(model_type: str = "llama", **overrides) -> QuietSTaRModule:
    spec = ModelSpec(config=tiny_config(model_type, **overrides), dtype="float64")
    module = QuietSTaRModule(spec, thought_length=THOUGHT_LENGTH, n_ahead_talk=2, max_new_tokens=5)
    with torch.no_grad():
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    return module.double().eval()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_thoughtful_generate_equals_naive_recomputation_with_left_padded_batch(model_type):
    module = make_module(model_type)
    out = assert_generate_equals_naive(module, [[1, 17, 25, 40, 9], [1, 33, 8], [1, 60, 61, 62]], 4)
    assert out.sequences.shape == (3, 5 + 4)
    assert out.thoughts.shape == (3, 4, THOUGHT_LENGTH) and out.mixing_weights.shape == (3, 4)
    assert out.mixing_weights.abs().sum() > 0


def test_delimiters_are_never_emitted_nor_thought_even_when_most_likely():
    module = make_module()
    forbidden = module.forbidden_ids

    def boost(_, __, logits):  # make the delimiters the model's favourite tokens
        logits = logits.clone()
        logits[..., forbidden] += 1e4
        return logits

    hook = module.lm.get_output_embeddings().register_forward_hook(boost)
    try:
        ids = torch.tensor([[1, 17, 25], [1, 33, 8]])
        out = module.generate(ids, max_new_tokens=4, eos_token_id=None, return_thoughts=True,
                              thought_temperature=1.0, temperature=1.0)
    finally:
        hook.remove()
    assert not torch.isin(out.sequences[:, 3:], forbidden).any()
    assert not torch.isin(out.thoughts, forbidden).any()


def test_generation_stops_rows_at_eos_and_restores_the_training_mode():
    module = make_module()
    ids = torch.tensor([[1, 17, 25], [1, 33, 8]])
    first = module.generate(ids, max_new_tokens=3, eos_token_id=None).sequences
    eos = int(first[0, 3])  # the first row's first token plays eos
    module.train()
    out = module.generate(ids, max_new_tokens=3, eos_token_id=eos, pad_token_id=0).sequences
    assert module.training and module.model.training
    assert out[0, 3] == eos and (out[0, 4:] == 0).all()
    row = first[1, 3:].tolist()
    expected = row[: row.index(eos) + 1] if eos in row else row
    assert out[1, 3: 3 + len(expected)].tolist() == expected


@torch.no_grad()
def dynamic_cache_generate(module: QuietSTaRModule, ids, mask, new_tokens: int, eos=None, pad=0, temperature=0.0,
                           generator=None):
    """The decoder as it was before the slot cache: a growing ``DynamicCache``, each thought appended to it
    (positions ``last + 1`` ... ``last + 2 + thought_length``) and cropped off after the token is chosen."""
    from transformers import DynamicCache

    from lightning_tokens.modeling import cache_keyword, decoder_of
    from lightning_tokens.quiet_star.parallel import forbid, positions_of, sample_tokens

    lm, te, forbidden = module.lm, module.thought_embeddings, module.forbidden_ids
    backbone, head, embed = decoder_of(lm), lm.get_output_embeddings(), lm.get_input_embeddings()
    batch, cache, text_mask = ids.shape[0], DynamicCache(), mask.long()
    grown = text_mask

    def step(inputs, position_ids):
        nonlocal grown
        grown = torch.cat([grown, grown.new_ones(batch, inputs.shape[1])], -1) if cache.get_seq_length() else grown
        out = backbone(inputs_embeds=inputs, attention_mask=grown, position_ids=position_ids, use_cache=True,
                       **{cache_keyword(backbone): cache})
        return out.last_hidden_state[:, -1]

    def sample(hidden, t):
        return sample_tokens(forbid(head(hidden), forbidden), t, generator)

    positions = positions_of(text_mask)
    base, last = step(embed(ids), positions), positions[:, -1:]
    done = torch.zeros(batch, dtype=torch.bool)
    tokens, thoughts, weights = [], [], []
    for _ in range(new_tokens):
        length, text_mask = cache.get_seq_length(), grown
        hidden, thought = step(te.start.expand(batch, 1, -1), last + 1), []
        for k in range(THOUGHT_LENGTH):
            thought.append(sample(hidden, temperature))
            hidden = step(embed(thought[-1])[:, None], last + 2 + k)
        hidden = step(te.end.expand(batch, 1, -1), last + 2 + THOUGHT_LENGTH)
        mixed, weight = module.mixing_head(base, hidden)
        token = torch.where(done, pad, sample(mixed, temperature))
        cache.crop(length - cache.get_seq_length())  # a negative count: remove the thought
        grown = text_mask
        tokens.append(token)
        thoughts.append(torch.stack(thought, -1))
        weights.append(weight.squeeze(-1))
        if eos is not None:
            done |= token == eos
        if bool(done.all()):
            break
        last = last + 1
        base = step(embed(token)[:, None], last)
    return torch.stack(tokens, 1), torch.stack(thoughts, 1), torch.stack(weights, 1)


PROMPTS = [[1, 17, 25, 40, 9, 12], [1, 33, 8], [1, 60, 61, 62]]


def left_padded():
    return padded_rows(PROMPTS, max(map(len, PROMPTS)), "left")


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}), ("qwen2", {}), ("mistral", {}), ("gpt2", {}),
    ("mistral", {"sliding_window": 4}),  # a window shorter than the sequence: slots past it are masked too
])
def test_slot_cache_emits_what_the_dynamic_cache_decoder_emitted(model_type, overrides):
    module = make_module(model_type, **overrides)
    ids, mask = left_padded()
    new = 5
    rows = dynamic_cache_generate(module, ids, mask, new)[0].tolist()
    # eos: a token some row emits first before its last step and another row never emits: one row stops early
    eos, stops = next((token, r) for r, row in enumerate(rows) for k, token in enumerate(row[:-1])
                      if token not in row[:k] and any(token not in other for other in rows))
    expected, thoughts, weights = dynamic_cache_generate(module, ids, mask, new, eos=eos, pad=0)
    out = module.generate(ids, mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=0, return_thoughts=True)
    assert expected[stops, -1] == 0 and any(eos not in row for row in expected.tolist())
    assert torch.equal(out.sequences, torch.cat([ids, expected], 1))
    assert torch.equal(out.thoughts, thoughts)
    torch.testing.assert_close(out.mixing_weights, weights.float())


def test_slot_cache_samples_what_the_dynamic_cache_decoder_sampled():
    module = make_module()
    ids, mask = left_padded()
    expected, thoughts, _ = dynamic_cache_generate(module, ids, mask, 4, temperature=1.0,
                                                   generator=torch.Generator().manual_seed(3))
    out = module.generate(ids, mask, max_new_tokens=4, eos_token_id=None, return_thoughts=True, temperature=1.0,
                          thought_temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.sequences[:, ids.shape[1]:], expected) and torch.equal(out.thoughts, thoughts)


def test_the_cache_is_allocated_once_and_written_in_place(monkeypatch):
    from lightning_tokens.quiet_star import generate

    caches, buffers, updates = [], set(), []

    class Recording(generate.SlotCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            buffers.add((layer_idx, keys.data_ptr(), values.data_ptr(), keys.shape[-2]))
            updates.append(key_states.shape[-2])
            return keys, values

    monkeypatch.setattr(generate, "SlotCache", Recording)
    module = make_module()
    ids, mask = left_padded()
    new, layers = 4, module.lm.config.num_hidden_layers
    module.generate(ids, mask, max_new_tokens=new, eos_token_id=None)
    assert len(caches) == 1
    # one buffer per layer for the whole call, sized prompt + new tokens + <sot>, thought and <eot> - 1
    assert len(buffers) == layers
    assert {size for *_, size in buffers} == {ids.shape[1] + new + THOUGHT_LENGTH + 1}
    # the prompt, then thought_length + 3 one-token steps per token (the last token is not read back)
    assert updates == [ids.shape[1]] * layers + [1] * layers * (new * (THOUGHT_LENGTH + 3) - 1)


@pytest.mark.slow
def test_compiled_steps_emit_what_eager_steps_emit():
    module = make_module()
    ids, mask = left_padded()
    eager = module.generate(ids, mask, max_new_tokens=3, eos_token_id=None, return_thoughts=True)
    compiled = module.generate(ids, mask, max_new_tokens=3, eos_token_id=None, return_thoughts=True, compile=True)
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(compiled.thoughts, eager.thoughts)
    torch.testing.assert_close(compiled.mixing_weights, eager.mixing_weights)
