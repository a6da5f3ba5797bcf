"""Hidden states captured with hooks (budget/capture.py) against ``output_hidden_states``, through LoRA and generate."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.budget import BudgetPredictor, HiddenStateCapture
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
def test_hook_capture_equals_output_hidden_states(model_type, tokenizer):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type)))
    model.eval()
    x = torch.randint(3, 300, (2, 7))
    with HiddenStateCapture(model, last_only=False) as capture:
        out = model(x, output_hidden_states=True)
        mask = torch.rand(2, 7) > 0.3
        reference = torch.stack(out.hidden_states, dim=2)  # (B, T, N + 1, H)
        torch.testing.assert_close(capture.states, reference)
        torch.testing.assert_close(capture.gather(mask), reference[mask])
    with HiddenStateCapture(model, mask=mask) as capture:
        model(x)
        torch.testing.assert_close(capture.states, reference[mask])
    with HiddenStateCapture(model) as capture:
        model(x)
        torch.testing.assert_close(capture.states, reference[:, -1])
        torch.testing.assert_close(capture.last_states(torch.tensor([1])), reference[[1], -1])
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())


def test_hook_capture_through_a_lora_wrapper(tokenizer):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("qwen2"), lora={"r": 4, "lora_alpha": 8}))
    model.eval()
    x = torch.randint(3, 300, (2, 6))
    with HiddenStateCapture(model, last_only=False) as capture:
        out = model(input_ids=x, output_hidden_states=True)
        torch.testing.assert_close(capture.states, torch.stack(out.hidden_states, dim=2))
    assert BudgetPredictor.for_model(model).config.num_states == 3


def test_hook_capture_during_generate_equals_a_full_forward(lm):
    model, tokenizer = lm
    enc = tokenizer(["Compute 1 + 2.", "Compute 12 + 30 - 4."], return_tensors="pt", padding=True)
    seen = []

    class Spy:
        def __call__(self, input_ids, scores):
            seen.append((input_ids.clone(), capture.states.clone()))
            return scores

    with HiddenStateCapture(model) as capture:
        out = model.generate(**enc, logits_processor=[Spy()], max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = out.shape[1] - enc["input_ids"].shape[1]
    mask = torch.cat([enc["attention_mask"], torch.ones(2, generated, dtype=torch.long)], 1)
    full = model(out, attention_mask=mask, output_hidden_states=True).hidden_states
    for sequence, states in seen:
        position = sequence.shape[1] - 1
        reference = torch.stack([h[:, position] for h in full], dim=1)
        torch.testing.assert_close(states, reference, rtol=1e-4, atol=1e-4)
