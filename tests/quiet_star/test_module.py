"""QuietSTaRModule: the same loss and gradients under left and right padding, finite ones on short and empty rows, the
initial mixing head and thought delimiters, and one clear error for each bad argument and unsupported setting."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule
from tests.quiet_star.naive import make_module
from tests.tiny import padded_rows, tiny_config


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_and_right_padding_give_the_same_loss_and_gradients(attn):
    # Rows of 3 and 4 tokens are shorter than a thought window (thought_length + 2 = 5) and than the talk steps.
    module = make_module(attn=attn)
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 3, 6, 4)]
    results = {}
    for side in ("right", "left"):
        module.zero_grad()
        out = module.quiet_star(*padded_rows(rows, 10, side), temperature=0.0)  # greedy thoughts: the same on both
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        results[side] = (out.metrics(), grads)
    (right, right_grads), (left, left_grads) = results["right"], results["left"]
    assert right["mixed_nll"] > 0 and right["reward"] != 0
    for name in right:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=1e-6, msg=name)
    assert right_grads.keys() == left_grads.keys() and right_grads
    for name in right_grads:
        torch.testing.assert_close(left_grads[name], right_grads[name], rtol=0, atol=1e-6, msg=name)


def test_short_samples_and_padding_rows_give_finite_loss_and_grads():
    module = make_module()
    ids = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 0, 0, 0], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    for rows in (slice(0, 2), slice(0, 3)):  # only short/empty rows, then with a full one
        module.zero_grad()
        out = module.quiet_star(ids[rows], mask[rows])
        out.loss.backward()
        assert all(torch.isfinite(v) for v in out.metrics().values()), out.metrics()
        for name, parameter in module.named_parameters():
            if parameter.grad is not None:
                assert torch.isfinite(parameter.grad).all(), name


def test_mixing_head_starts_from_the_base_model_and_delimiters_from_dashes(tokenizer):
    module = QuietSTaRModule(ModelSpec(config=tiny_config("llama")), thought_length=2, n_ahead_talk=2)
    assert torch.count_nonzero(module.mixing_head.net[-1].weight) == 0
    dash = tokenizer("---", add_special_tokens=False)["input_ids"][0]
    embedding = module.lm.get_input_embeddings().weight
    torch.testing.assert_close(module.thought_embeddings.start, embedding[dash])
    torch.testing.assert_close(module.thought_embeddings.end, embedding[dash])
    torch.testing.assert_close(module.thought_embeddings.scaled[0], embedding[dash] / 100)
    ids = torch.randint(3, 300, (2, 7))
    out = module.quiet_star(ids, torch.ones_like(ids))
    assert out.mixing_weight == 0 and out.reward.abs() < 1e-6 and out.policy_loss == 0
    delimiters = [module.start_id, module.end_id]
    assert module.tokenizer.convert_ids_to_tokens(delimiters) == ["<|startthought|>", "<|endthought|>"]
    decoded = module.tokenizer.decode([module.start_id, 5, module.end_id], skip_special_tokens=True)
    assert decoded == module.tokenizer.decode([5])


@pytest.mark.parametrize("field,value,message", [
    ("n_thoughts", 0, "n_thoughts"), ("thought_length", 0, "thought_length"), ("n_ahead_talk", 0, "n_ahead_talk"),
    ("base_loss_weight", 1.5, "base_loss_weight"), ("train_on", "prompt", "train_on"),
    ("thought_init", "", "thought_init"),
])
def test_bad_arguments_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        QuietSTaRModule(ModelSpec(config=tiny_config("llama")), **{field: value})


def test_clear_errors_for_flash_attention_and_gradient_checkpointing():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        QuietSTaRModule(ModelSpec(config=tiny_config("llama"), gradient_checkpointing=True))
    with pytest.raises(ValueError, match="flash_attention_2"):
        QuietSTaRModule(ModelSpec(config=tiny_config("llama"), attn_implementation="flash_attention_2"))
    module = QuietSTaRModule(ModelSpec(config=tiny_config("llama")), thought_length=1, n_ahead_talk=1)
    enable = getattr(module.lm, "activation_checkpointing_enable", None) or module.lm.gradient_checkpointing_enable
    enable()
    ids = torch.randint(3, 300, (1, 4))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        module.quiet_star(ids, torch.ones_like(ids))
