"""capture_trunk, Trunk.narrow, final_norm and causal_additive_mask against the model's own hidden states, plain
slicing and a mask built position by position."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.caft import capture_trunk
from lightning_tokens.caft.trunk import causal_additive_mask, final_norm
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import padded_rows, tiny_config


def tiny(model_type: str):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type)))
    return model.eval()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_trunk_is_the_last_layers_input_or_with_final_the_final_hidden_state(model_type):
    model = tiny(model_type)
    ids, mask = padded_rows([[1, 7, 9, 11, 13], [1, 30, 2]], 5, "right")

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    model(input_ids=ids, output_hidden_states=True)  # transformers adds hooks of its own on the first such call
    before = hooks()
    with torch.no_grad():
        with capture_trunk(model) as holder:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with capture_trunk(model, final=True) as final:
            model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(holder["trunk"].hidden, out.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(final["trunk"].hidden, out.hidden_states[-1], rtol=0, atol=0)
    assert torch.equal(final["trunk"].input_ids, ids) and holder["trunk"].input_ids is None
    assert (holder["trunk"].position_embeddings is None) == (model_type == "gpt2")  # gpt2 has no rotary embeddings
    assert hooks() == before  # every hook is removed when the block ends


def test_narrow_slices_the_positions_of_every_field():
    model = tiny("llama")
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_trunk(model, final=True) as holder:
        model(input_ids=ids, position_ids=torch.arange(9)[None].expand(2, -1))
    trunk = holder["trunk"]
    part = trunk.narrow(3, 4)
    assert torch.equal(part.hidden, trunk.hidden[:, 3:7])
    assert torch.equal(part.input_ids, ids[:, 3:7])
    assert torch.equal(part.position_ids, torch.arange(3, 7)[None].expand(2, -1))


def test_final_norm_is_the_models_last_norm():
    llama, gpt2 = tiny("llama"), tiny("gpt2")
    assert final_norm(llama) is llama.model.norm
    assert final_norm(gpt2) is gpt2.transformer.ln_f


def naive_mask(attention_mask, query_length, past_length, segments):
    """Allowed (True) or not for every (row, query, key), one position at a time."""
    batch, total = attention_mask.shape
    allowed = torch.zeros(batch, query_length, total, dtype=torch.bool)
    for b in range(batch):
        for i in range(query_length):
            q = past_length + i
            for j in range(total):
                same = segments is None or segments[b, j] == segments[b, q]
                allowed[b, i, j] = j == q or (j < q and bool(attention_mask[b, j]) and same)
    return allowed


@pytest.mark.parametrize("past_length", [0, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_causal_additive_mask_equals_a_mask_built_position_by_position(past_length, packed):
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 2, 3, 3]]) if packed else None
    query_length = 8 - past_length
    got = causal_additive_mask(attention_mask, query_length, past_length, torch.float32, torch.device("cpu"),
                               segments=segments)
    assert got.shape == (2, 1, query_length, 8)
    want = naive_mask(attention_mask, query_length, past_length, segments)
    assert torch.equal(got[:, 0] == 0, want)
    assert torch.all(got[:, 0][~want] == torch.finfo(torch.float32).min)
