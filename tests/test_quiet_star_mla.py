"""Quiet-STaR on DeepSeek's multi-head latent attention (deepseek_v3): value heads of another head size than the
query and key heads (real checkpoints: 192 against 128), with and without q-LoRA, and a YaRN ``mscale`` that makes
the attention's softmax scale differ from ``head_dim ** -0.5``. The same references as the other architectures:
dense attention, naive sequential re-runs, the growing-cache passes and the full-recomputation generator."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from conftest import padded_rows, tiny_config
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.quiet_star import QuietSTaRModule
from lightning_tokens.quiet_star.attention import two_part_attention
from test_quiet_star import N_THOUGHTS, TALK, THOUGHT_LENGTH, TOL, naive_branch, run_passes
from test_quiet_star_attention import assert_equal_to_the_growing_cache, dense_reference
from test_quiet_star_generate import assert_generate_equals_naive

# conftest's deepseek_v3 has query/key heads of 8 + 8 = 16 and value heads of 8
MLA = {
    "v-smaller": {},
    "q-lora": dict(q_lora_rank=8),
    "v-larger": dict(v_head_dim=24),
    "yarn-mscale": dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0, mscale=1.0,
        mscale_all_dim=1.0)),
}


pytestmark = pytest.mark.filterwarnings("ignore")


def deepseek_module(case: str, **options) -> QuietSTaRModule:
    # transformers' grouped_mm experts take no float64: the per-expert loop does
    config = tiny_config("deepseek_v3", experts_implementation="eager", **MLA[case])
    module = QuietSTaRModule(ModelSpec(config=config, dtype="float64"), **options)
    torch.manual_seed(1)
    with torch.no_grad():  # a mixing head that mixes, so every part of the loss has a gradient
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    return module.double()


def head_sizes(module: QuietSTaRModule) -> tuple[int, int, float]:
    """Query/key and value head sizes and the softmax scale of the first attention layer."""
    attention = module.lm.model.layers[0].self_attn
    return attention.qk_head_dim, attention.v_head_dim, attention.scaling


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("key_dim,value_dim", [(6, 4), (4, 7)])
def test_two_part_attention_with_value_heads_of_their_own_size(fused, key_dim, value_dim):
    generator = torch.Generator().manual_seed(key_dim * 10 + value_dim)
    batch, n, kv_heads, groups, length = 2, 2, 2, 2, 6

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    query = rand(batch * n, kv_heads * groups, length, key_dim)
    text_key, text_value = rand(batch, kv_heads, length, key_dim), rand(batch, kv_heads, length, value_dim)
    keys = [rand(batch * n, kv_heads, length, key_dim) for _ in range(2)]
    values = [rand(batch * n, kv_heads, length, value_dim) for _ in range(2)]
    allowed = torch.rand(batch, length, length, generator=generator) > 0.4
    allowed[1, 3] = False  # a query reading no text key
    inputs = [query, text_key, text_value, *keys, *values]
    out = two_part_attention(query, text_key, text_value, allowed, keys, values, 0.3, chunk=4, fused=fused)
    expected = dense_reference(query, text_key, text_value, allowed, keys, values, 0.3)
    assert out.shape == (batch * n, kv_heads * groups, length, value_dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


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


@pytest.mark.parametrize("case", list(MLA))
def test_thoughtful_generate_equals_naive_recomputation(case):
    module = deepseek_module(case, thought_length=3, n_ahead_talk=2).eval()  # naive_generate's thought length
    assert_generate_equals_naive(module, [[1, 17, 25, 40, 9], [1, 33, 8]], 3)


def test_training_moves_the_moe_router_and_the_latent_attention(tmp_path):
    """float32, transformers' default experts implementation: a plain fit of two steps."""
    spec = ModelSpec(config=tiny_config("deepseek_v3", v_head_dim=12))
    module = QuietSTaRModule(spec, optimizer=OptimizerConfig(lr=1e-2, warmup=0), n_thoughts=2, thought_length=2,
                             n_ahead_talk=2, max_new_tokens=3)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    data = SFTDataModule(task=ReasoningTask(num_train=8, num_val=4), batch_size=4, max_length=40)
    Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            default_root_dir=tmp_path).fit(module, datamodule=data)
    changed = {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}
    for part in (".mlp.gate.weight", ".mlp.experts.", ".self_attn.kv_b_proj.", ".self_attn.o_proj.",
                 "thought_embeddings.scaled"):
        assert any(part in name for name in changed), part
    assert all(torch.isfinite(p).all() for p in module.parameters())
