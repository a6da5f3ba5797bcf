"""Thoughtful generation on the families whose forward differs from Llama's: tokens and thoughts sampled from the
model's own (post-processed) logits, a sliding window in some layers, DeepSeek's multi-head latent attention; against
re-computations from full sequences."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.modeling import decoder_of
from lightning_tokens.quiet_star import QuietSTaRModule
from lightning_tokens.quiet_star.parallel import sample_tokens
from tests.quiet_star.families import MLA, POST, WINDOWED, deepseek_module, masked, post_module, windowed_module
from tests.quiet_star.naive import THOUGHT_LENGTH, assert_generate_equals_naive

pytestmark = pytest.mark.filterwarnings("ignore")


def own_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """``(N, V)`` the logits the model's own forward makes of final hidden states ``(N, d)``: a forward whose decoder
    output is replaced by them (its output layer and post-processing, whatever they are)."""
    def replace(module, args, output):
        output.last_hidden_state = hidden[None]
        return output

    handle = decoder_of(lm).register_forward_hook(replace)
    try:
        with torch.no_grad():
            return lm(input_ids=torch.zeros(1, hidden.shape[0], dtype=torch.long)).logits[0]
    finally:
        handle.remove()


@torch.no_grad()
def sampled_generate(module: QuietSTaRModule, prompt: list[int], new_tokens: int, generator: torch.Generator,
                     own: bool = True):
    """Thoughts and tokens sampled at temperature 1 from full forwards, from the model's own logits (``own``) or its
    bare output layer's, in the order thoughtful generation draws them."""
    lm, te, forbidden = module.lm, module.thought_embeddings, module.forbidden_ids
    embed = lm.get_input_embeddings()

    def logits_of(hidden):
        return own_logits(lm, hidden[None])[0] if own else lm.get_output_embeddings()(hidden)

    def last_hidden(embeds):
        return lm(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[-1][0, -1]

    def sample(hidden):
        return int(sample_tokens(masked(logits_of(hidden), forbidden)[None], 1.0, generator)[0])

    tokens, thoughts = list(prompt), []
    for _ in range(new_tokens):
        text = embed(torch.tensor(tokens))
        embeds = torch.cat([text, te.start[None]])
        thought = []
        for _ in range(THOUGHT_LENGTH):
            thought.append(sample(last_hidden(embeds)))
            embeds = torch.cat([embeds, embed(torch.tensor(thought[-1:]))])
        after = last_hidden(torch.cat([embeds, te.end[None]]))
        mixed, _ = module.mixing_head(last_hidden(text), after)
        tokens.append(sample(mixed))
        thoughts.append(thought)
    return tokens[len(prompt):], thoughts


@pytest.mark.parametrize("case", list(POST))
def test_thoughtful_generation_samples_from_the_models_own_logits(case):
    module = post_module(case)
    prompt = [1, 17, 25, 40, 9]
    out = module.generate(torch.tensor([prompt]), max_new_tokens=3, eos_token_id=None, return_thoughts=True,
                          temperature=1.0, thought_temperature=1.0, generator=torch.Generator().manual_seed(4))
    tokens, thoughts = sampled_generate(module, prompt, 3, torch.Generator().manual_seed(4))
    assert out.sequences[0, len(prompt):].tolist() == tokens
    assert out.thoughts[0].tolist() == thoughts
    bare = sampled_generate(module, prompt, 3, torch.Generator().manual_seed(4), own=False)
    assert bare != (tokens, thoughts), "the bare output layer samples the same: the test would not see the difference"


@pytest.mark.parametrize("case", list(WINDOWED))
def test_windowed_thoughtful_generate_equals_naive_recomputation(case):
    """Prompts of 6 tokens, 4 new ones and thoughts of 3: the window of 4 hides most of the text."""
    module = windowed_module(case).eval()
    assert_generate_equals_naive(module, [[1, 17, 25, 40, 9, 12], [1, 33, 8, 5]], 4)


@pytest.mark.parametrize("case", list(MLA))
def test_thoughtful_generate_equals_naive_recomputation(case):
    module = deepseek_module(case, thought_length=3, n_ahead_talk=2).eval()  # naive_generate's thought length
    assert_generate_equals_naive(module, [[1, 17, 25, 40, 9], [1, 33, 8]], 3)
