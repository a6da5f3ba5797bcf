"""Generation with a mixture-of-experts model set up for training (``output_router_logits=True`` in its config) gives
the tokens it gives without router logits: the router loss is a training term, and transformers' own ``generate``
fails on a left-padded batch with it."""

from __future__ import annotations

import pytest

from lightning_tokens import CausalLMModule, ModelSpec
from lightning_tokens.budget.traces import collect_traces
from lightning_tokens.caft import MultiTokenHeads, generate_with_heads
from tests.tiny import padded_rows

MOE = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=8, moe_intermediate_size=16, num_experts=4),
}
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, initializer_range=0.2, output_router_logits=True)
PROMPTS = [[1, 7, 9, 11, 12, 13], [1, 30, 40]]
MAX_NEW = 8


def routed_module(case: str) -> CausalLMModule:
    module = CausalLMModule(ModelSpec(config={**SIZES, **MOE[case]}), max_new_tokens=MAX_NEW).eval()
    assert module.model.config.output_router_logits
    return module


def without_router_logits(module: CausalLMModule, run):
    """What ``run()`` returns with the model's config set to ``output_router_logits=False``."""
    module.model.config.output_router_logits = False
    try:
        return run()
    finally:
        module.model.config.output_router_logits = True


@pytest.mark.parametrize("case", list(MOE))
def test_generate_with_heads_of_a_routed_moe_model_equals_its_plain_greedy_generate(case):
    module = routed_module(case)
    heads = MultiTokenHeads(module.model, num_heads=2, architecture="layer").eval()
    ids, mask = padded_rows(PROMPTS, 6, "left")
    got, stats = generate_with_heads(module.model, heads, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[],
                                     pad_token_id=0)
    expected = without_router_logits(module, lambda: module.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0, eos_token_id=None))
    assert got.tolist() == expected.tolist()
    assert stats.row_new_tokens == [MAX_NEW, MAX_NEW]


@pytest.mark.parametrize("case", list(MOE))
def test_module_generate_and_predict_of_a_routed_moe_model_equal_them_without_router_logits(case):
    module = routed_module(case)
    ids, mask = padded_rows(PROMPTS, 6, "left")
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask, "answers": ["3", None]}
    got = module.generate(ids, mask), module.predict_step(batch, 0)
    expected = without_router_logits(module, lambda: (module.generate(ids, mask), module.predict_step(batch, 0)))
    assert got == expected
    assert [len(row) for row in got[0]] != [0, 0]  # not vacuous: something was generated


def test_collect_traces_of_a_routed_moe_model_equals_them_without_router_logits():
    module = routed_module("mixtral")
    prompts = [{"prompt": "Compute 1 + 2.<think>\n", "answer": "3"}, "Compute 12 + 30 - 4.<think>\n1"]
    got = collect_traces(module.model, module.tokenizer, prompts, max_new_tokens=6, batch_size=2)
    expected = without_router_logits(module, lambda: collect_traces(module.model, module.tokenizer, prompts,
                                                                    max_new_tokens=6, batch_size=2))
    assert got == expected
