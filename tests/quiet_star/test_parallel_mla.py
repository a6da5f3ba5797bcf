"""The thought passes on DeepSeek's multi-head latent attention (deepseek_v3): value heads of another head size than the
query and key heads (real checkpoints: 192 against 128), with and without q-LoRA, and a YaRN ``mscale`` that makes
the attention's softmax scale differ from ``head_dim ** -0.5``. Against naive sequential re-runs and the
growing-cache passes."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.quiet_star import QuietSTaRModule
from tests.quiet_star.families import MLA, deepseek_module
from tests.quiet_star.naive import (
    N_THOUGHTS,
    TALK,
    THOUGHT_LENGTH,
    TOL,
    assert_equal_to_the_growing_cache,
    naive_branch,
    run_passes,
)
from tests.tiny import padded_rows

pytestmark = pytest.mark.filterwarnings("ignore")


def head_sizes(module: QuietSTaRModule) -> tuple[int, int, float]:
    """Query/key and value head sizes and the softmax scale of the first attention layer."""
    attention = module.lm.model.layers[0].self_attn
    return attention.qk_head_dim, attention.v_head_dim, attention.scaling


def test_the_cases_cover_both_head_size_orders_and_a_scale_of_their_own():
    sizes = {case: head_sizes(deepseek_module(case)) for case in MLA}
    assert sizes["v-smaller"][1] < sizes["v-smaller"][0] < sizes["v-larger"][1]
    key_dim, _, scaling = sizes["yarn-mscale"]
    assert abs(scaling - key_dim ** -0.5) > 0.05
    assert deepseek_module("q-lora").lm.model.layers[0].self_attn.q_a_proj is not None


@pytest.mark.parametrize("case", list(MLA))
@torch.no_grad()
def test_parallel_thoughts_equal_naive_sequential_generation(case, thought_attention_path):
    module = deepseek_module(case, thought_length=THOUGHT_LENGTH, n_ahead_talk=TALK, n_thoughts=N_THOUGHTS).eval()
    ids, mask = padded_rows([[5, 17, 33, 8, 90, 41, 7], [12, 250, 3, 64, 19]], 7, "right")
    passes = run_passes(module, ids, mask)
    head = module.lm.get_output_embeddings()
    compared = 0
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            future = ids[b, i + 1: min(length, i + TALK + 1)]
            thought, (base_logits, _), talk = naive_branch(module, ids[b, : i + 1], future)
            torch.testing.assert_close(head(passes.base_hidden[b, i]), base_logits, **TOL)
            for k in range(N_THOUGHTS):
                row = b * N_THOUGHTS + k
                assert passes.thought_tokens[row, i].tolist() == thought, (b, i, k)
                for s, (logits, hidden) in enumerate(talk):
                    torch.testing.assert_close(passes.talk_hidden[s][row, i], hidden, **TOL)
                    compared += 1
    assert compared > 20


@pytest.mark.parametrize("case", list(MLA))
def test_loss_and_gradients_equal_the_growing_cache(monkeypatch, case, thought_attention_path):
    module = deepseek_module(case, thought_length=2, n_ahead_talk=2, n_thoughts=2, policy_weight=1.0)
    g = torch.Generator().manual_seed(5)
    batch = padded_rows([torch.randint(3, 300, (n,), generator=g).tolist() for n in (8, 5)], 8, "left")
    expected_grads = assert_equal_to_the_growing_cache(monkeypatch, module, batch)
    assert any(".self_attn.kv_b_proj." in name for name in expected_grads)
