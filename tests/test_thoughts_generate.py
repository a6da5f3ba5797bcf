"""Thoughtful generation against a naive re-computation from full sequences, batch > 1, delimiters never emitted."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.thoughts import QuietSTaRModule

THOUGHT_LENGTH = 3


def make_module(model_type: str = "llama") -> QuietSTaRModule:
    spec = ModelSpec(config=tiny_config(model_type), dtype="float64")
    module = QuietSTaRModule(spec, thought_length=THOUGHT_LENGTH, n_ahead_talk=2, max_new_tokens=5)
    with torch.no_grad():
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    return module.double().eval()


@torch.no_grad()
def naive_generate(module: QuietSTaRModule, prompt: list[int], new_tokens: int):
    """Each token from full forwards of ``prompt + emitted [+ <sot> thought <eot>]``; no cache."""
    lm, te, forbidden = module.lm, module.thought_embeddings, module.forbidden_ids
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()

    def last_hidden(embeds):
        return lm(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[-1][0, -1]

    def masked(logits):
        logits = logits.clone()
        logits[forbidden] = float("-inf")
        return logits

    tokens, thoughts = list(prompt), []
    for _ in range(new_tokens):
        text = embed(torch.tensor(tokens))
        base = last_hidden(text)
        embeds = torch.cat([text, te.start[None]])
        thought = []
        for _ in range(THOUGHT_LENGTH):
            token = int(masked(head(last_hidden(embeds))).argmax())
            thought.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([token]))])
        after = last_hidden(torch.cat([embeds, te.end[None]]))
        w = module.mixing_head.net(torch.cat([base, after]))
        logits = masked((1 - w) * head(base) + w * head(after))  # logits mixing, independent of the code's
        tokens.append(int(logits.argmax()))
        thoughts.append(thought)
    return tokens[len(prompt):], thoughts


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_thoughtful_generate_equals_naive_recomputation_with_left_padded_batch(model_type):
    module = make_module(model_type)
    prompts = [[1, 17, 25, 40, 9], [1, 33, 8], [1, 60, 61, 62]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = module.generate(ids, mask, max_new_tokens=4, eos_token_id=None, return_thoughts=True)
    assert out.sequences.shape == (3, width + 4)
    assert out.thoughts.shape == (3, 4, THOUGHT_LENGTH) and out.mixing_weights.shape == (3, 4)
    assert out.mixing_weights.abs().sum() > 0
    for row, prompt in enumerate(prompts):
        tokens, thoughts = naive_generate(module, prompt, 4)
        assert out.sequences[row, width:].tolist() == tokens
        assert out.thoughts[row].tolist() == thoughts


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
