"""Tiny Quiet-STaR modules of the families whose forward differs from Llama's in ways the thought passes must follow.

- logits post-processed after the output layer (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma 2's
  ``final_logit_softcapping``): :data:`POST`, :func:`post_module`;
- soft-capped attention scores (Gemma 2's ``attn_logit_softcapping``): :func:`soft_capped_module`;
- a sliding window in some layers only (Gemma 3, Cohere 2: ``config.layer_types``): :data:`WINDOWED`,
  :func:`windowed_module`;
- DeepSeek's multi-head latent attention (deepseek_v3): :data:`MLA`, :func:`deepseek_module`.
"""

from __future__ import annotations

import torch

from lightning_tokens.modeling import ModelSpec, decoder_of
from lightning_tokens.quiet_star import QuietSTaRModule
from tests.quiet_star.naive import N_THOUGHTS, TALK, THOUGHT_LENGTH
from tests.tiny import tiny_config

_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


#: Post-processing of logits of a few units (see :func:`post_module`): the cap below their largest, not far below.
POST = {
    "granite": dict(model_type="granite", logits_scaling=8.0),
    "cohere": dict(model_type="cohere", logit_scale=0.0625),
    "gemma2": dict(model_type="gemma2", head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=5.0),
}


#: A window of 4 in the first layer only, shorter than the rows and than a thought's passes.
WINDOWED = {
    "gemma3_text": dict(model_type="gemma3_text", head_dim=8, query_pre_attn_scalar=8),
    "cohere2": dict(model_type="cohere2"),
}


WINDOW = 4


#: Gemma 2's eager attention takes its softmax in float32 (transformers): float32's precision against these float64
#: models, relative to the largest entry.
EAGER_PRECISION = 1e-5


# tests.tiny's deepseek_v3 has query/key heads of 8 + 8 = 16 and value heads of 8
MLA = {
    "v-smaller": {},
    "q-lora": dict(q_lora_rank=8),
    "v-larger": dict(v_head_dim=24),
    "yarn-mscale": dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0, mscale=1.0,
        mscale_all_dim=1.0)),
}


def family_module(config: dict, **options) -> QuietSTaRModule:
    options = {"thought_length": THOUGHT_LENGTH, "n_ahead_talk": TALK, "n_thoughts": N_THOUGHTS, **options}
    module = QuietSTaRModule(ModelSpec(config={**_SIZES, **config}, dtype="float64"), **options)
    torch.manual_seed(1)
    with torch.no_grad():  # a mixing head that mixes
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    return module.double()


def post_module(case: str) -> QuietSTaRModule:
    """The ``POST`` case, its final hidden states scaled up 30 times: logits of a few units, as a trained model's (a
    random tiny model's are all near 0, where no post-processing shows)."""
    module = family_module(POST[case]).eval()
    decoder_of(module.lm).norm.register_forward_hook(lambda _, args, output: output * 30)
    return module


def windowed_module(case: str, **options) -> QuietSTaRModule:
    config = dict(WINDOWED[case], sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    return family_module(config, **options)


def soft_capped_module(sliding_window: int = 4096, **options) -> QuietSTaRModule:
    """Gemma 2 whose attention scores reach its soft cap: query and key weights scaled up, the cap at 1."""
    config = dict(POST["gemma2"], attn_logit_softcapping=1.0, sliding_window=sliding_window)
    module = family_module(config, **options)
    with torch.no_grad():
        for layer in module.lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    return module


def masked(logits: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    return logits.index_fill(-1, forbidden, float("-inf"))


def deepseek_module(case: str, **options) -> QuietSTaRModule:
    # transformers' grouped_mm experts take no float64: the per-expert loop does
    config = tiny_config("deepseek_v3", experts_implementation="eager", **MLA[case])
    module = QuietSTaRModule(ModelSpec(config=config, dtype="float64"), **options)
    torch.manual_seed(1)
    with torch.no_grad():  # a mixing head that mixes, so every part of the loss has a gradient
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    return module.double()
