"""The thought passes on the families whose forward differs from Llama's in ways they must follow:

- logits post-processed after the output layer (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma 2's
  ``final_logit_softcapping``): every sampled token and the entropy ranking come from the model's own logits;
- soft-capped attention scores (Gemma 2's ``attn_logit_softcapping``);
- a sliding window in some layers only (Gemma 3, Cohere 2: ``config.layer_types``), on sequences longer than it;
- ALiBi (Falcon), refused.

References: the model's own forward on whole sequences (transformers' masks and attention) and the growing-cache
passes of :func:`tests.quiet_star.naive.cached_parallel_thoughts`.
"""

from __future__ import annotations

import pytest
import torch

from lightning_tokens import lean_loss
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule, parallel, parallel_thoughts
from tests.quiet_star.families import (
    EAGER_PRECISION,
    POST,
    WINDOW,
    WINDOWED,
    family_module,
    masked,
    post_module,
    soft_capped_module,
    windowed_module,
)
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


# -- logits post-processing -------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("case", list(POST))
def test_sampled_thoughts_come_from_the_models_own_logits(case):
    """Thoughts sampled at temperature 1 in the passes are the Gumbel-max samples, with the same noise, of the model's
    own logits of each branch re-run as one sequence."""
    module = post_module(case)
    lm, te, forbidden = module.lm, module.thought_embeddings, module.forbidden_ids
    embed = lm.get_input_embeddings()
    ids = torch.tensor([[5, 17, 33, 8, 90]])
    passes = parallel_thoughts(lm, ids, torch.ones_like(ids), te.start, te.end, forbidden, N_THOUGHTS, THOUGHT_LENGTH,
                               TALK, temperature=1.0, generator=torch.Generator().manual_seed(6))
    noise = torch.Generator().manual_seed(6)
    vocab = lm.config.vocab_size
    gumbel = [-torch.log(-torch.log(torch.rand(N_THOUGHTS, 5, vocab, generator=noise).clamp(1e-20, 1.0 - 1e-7)))
              for _ in range(THOUGHT_LENGTH)]
    for row in range(N_THOUGHTS):
        for i in range(5):
            embeds, thought = torch.cat([embed(ids[0, : i + 1]), te.start[None]]), []
            for k in range(THOUGHT_LENGTH):
                logits = masked(lm(inputs_embeds=embeds[None]).logits[0, -1], forbidden)
                thought.append(int((logits.float() + gumbel[k][row, i]).argmax()))
                embeds = torch.cat([embeds, embed(torch.tensor(thought[-1:]))])
            assert passes.thought_tokens[row, i].tolist() == thought, (row, i)


@torch.no_grad()
@pytest.mark.parametrize("case", list(POST))
def test_think_at_ranks_positions_by_the_entropy_of_the_models_own_logits(case):
    module = post_module(case)
    lm, te, forbidden = module.lm, module.thought_embeddings, module.forbidden_ids
    ids = torch.tensor([[5, 17, 33, 8, 90, 41, 7, 66, 12, 250]])
    passes = parallel_thoughts(lm, ids, torch.ones_like(ids), te.start, te.end, forbidden, 1, 1, 1, temperature=0.0,
                               think_at=3)
    log_p = masked(lm(input_ids=ids).logits[0], forbidden).log_softmax(-1)
    entropy = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
    assert sorted(passes.positions.index[0].tolist()) == sorted(entropy.topk(3).indices.tolist())


def test_a_model_with_logits_post_processing_it_does_not_know_is_refused():
    module = family_module(dict(model_type="llama"))
    lm = module.lm
    lm.register_forward_hook(lambda _, args, output: output.__setitem__("logits", output.logits + 1.0))
    parallel._interface_checked.pop(lm, None)  # checked when the module was built, before the hook
    lean_loss._checked.discard(lm)
    with pytest.raises(ValueError, match="post-processes its logits"):
        parallel.check_supported(lm)


# -- soft-capped attention (Gemma 2) ----------------------------------------------------------------------------
def test_the_soft_cap_matters_in_the_gemma2_tests():
    module = soft_capped_module()
    ids = torch.tensor([[5, 17, 33, 8, 90, 41, 7]])
    with torch.no_grad():
        capped = module.lm(input_ids=ids).logits
        for layer in module.lm.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = module.lm(input_ids=ids).logits
    assert (capped - uncapped).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("sliding_window", [4096, WINDOW])
def test_soft_capped_passes_equal_naive_sequential_generation(thought_attention_path, sliding_window):
    module = soft_capped_module(sliding_window).eval()
    ids, mask = padded_rows([[5, 17, 33, 8, 90, 41, 7], [12, 250, 3, 64, 19]], 7, "right")
    passes = run_passes(module, ids, mask)
    compared = 0
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            future = ids[b, i + 1: min(length, i + TALK + 1)]
            thought, (_, base_hidden), talk = naive_branch(module, ids[b, : i + 1], future)
            torch.testing.assert_close(passes.base_hidden[b, i], base_hidden, rtol=0,
                                       atol=EAGER_PRECISION * base_hidden.abs().max())
            for k in range(N_THOUGHTS):
                row = b * N_THOUGHTS + k
                assert passes.thought_tokens[row, i].tolist() == thought, (b, i, k)
                for s, (_, hidden) in enumerate(talk):
                    torch.testing.assert_close(passes.talk_hidden[s][row, i], hidden, rtol=0,
                                               atol=EAGER_PRECISION * hidden.abs().max())
                    compared += 1
    assert compared > 20


def test_soft_capped_loss_and_gradients_equal_the_growing_cache(monkeypatch, thought_attention_path):
    """transformers' own eager attention (which soft-caps) on a growing cache gives the same loss and gradients (to
    the precision of its float32 softmax)."""
    module = soft_capped_module(thought_length=2, n_ahead_talk=2, policy_weight=1.0)
    g = torch.Generator().manual_seed(5)
    batch = padded_rows([torch.randint(3, 300, (n,), generator=g).tolist() for n in (8, 5)], 8, "left")
    expected_grads = assert_equal_to_the_growing_cache(
        monkeypatch, module, batch, loss_atol=1e-6,
        gradient_tolerance=lambda value: dict(rtol=0, atol=EAGER_PRECISION * value.abs().max()))
    assert any(".self_attn.k_proj." in name for name in expected_grads)


# -- a sliding window in some layers ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(WINDOWED))
def test_each_layer_keeps_its_own_window(case):
    assert parallel.layer_windows(windowed_module(case).lm) == [WINDOW, None]


@torch.no_grad()
@pytest.mark.parametrize("think_at", ["all", 3])
@pytest.mark.parametrize("case", list(WINDOWED))
def test_windowed_passes_equal_naive_sequential_generation(case, think_at, thought_attention_path):
    """Rows of 9 and 7 tokens, 7 passes after the text: the window of 4 hides text keys, and at the later passes the
    query's own position and its first thought keys too."""
    module = windowed_module(case).eval()
    ids, mask = padded_rows([[5, 17, 33, 8, 90, 41, 7, 66, 12], [12, 250, 3, 64, 19, 23, 101]], 9, "right")
    te = module.thought_embeddings
    passes = parallel_thoughts(module.lm, ids, mask, te.start, te.end, module.forbidden_ids, N_THOUGHTS,
                               THOUGHT_LENGTH, TALK, temperature=0.0, think_at=think_at)
    slots = [list(range(int(mask[b].sum()))) for b in range(2)] if passes.positions is None else \
        [[int(i) for i, ok in zip(passes.positions.index[b], passes.positions.valid[b]) if ok] for b in range(2)]
    compared = 0
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            future = ids[b, i + 1: min(length, i + TALK + 1)]
            thought, (_, base_hidden), talk = naive_branch(module, ids[b, : i + 1], future)
            torch.testing.assert_close(passes.base_hidden[b, i], base_hidden, **TOL)
            if i not in slots[b]:
                continue
            slot = slots[b].index(i) if passes.positions is not None else i
            for k in range(N_THOUGHTS):
                row = b * N_THOUGHTS + k
                assert passes.thought_tokens[row, slot].tolist() == thought, (b, i, k)
                for s, (_, hidden) in enumerate(talk):
                    torch.testing.assert_close(passes.talk_hidden[s][row, slot], hidden, **TOL)
                    compared += 1
    assert compared > (10 if think_at == "all" else 5)


@pytest.mark.parametrize("case", list(WINDOWED))
def test_windowed_loss_and_gradients_equal_the_growing_cache(monkeypatch, case, thought_attention_path):
    module = windowed_module(case, thought_length=2, n_ahead_talk=3, policy_weight=1.0)
    g = torch.Generator().manual_seed(5)
    batch = padded_rows([torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 6)], 9, "left")
    assert_equal_to_the_growing_cache(monkeypatch, module, batch)


def test_a_layer_type_the_passes_do_not_know_is_refused():
    module = windowed_module("gemma3_text")
    module.lm.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"layer_types .*chunked_attention"):
        parallel.layer_windows(module.lm)


# -- ALiBi ------------------------------------------------------------------------------------------------------
def test_alibi_falcon_is_refused():
    """transformers 5.23's Falcon attention skips the attention interface; 5.25's goes through it and adds ALiBi to
    the mask, which the thought attention would drop."""
    config = dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    with pytest.raises(ValueError, match=r"ALiBi|attention interface"):
        QuietSTaRModule(ModelSpec(config=config))
