"""Quiet-STaR on the families whose forward differs from Llama's in ways the thought passes must follow:

- logits post-processed after the output layer (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma 2's
  ``final_logit_softcapping``): every loss part and every sampled token come from the model's own logits;
- soft-capped attention scores (Gemma 2's ``attn_logit_softcapping``);
- a sliding window in some layers only (Gemma 3, Cohere 2: ``config.layer_types``), on sequences longer than it;
- ALiBi (Falcon), refused.

References: the model's own forward on whole sequences (transformers' masks and attention), the growing-cache passes
of ``test_quiet_star_attention`` and dense attention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import padded_rows
from lightning_tokens import lean_loss
from lightning_tokens.modeling import ModelSpec, decoder_of
from lightning_tokens.quiet_star import QuietSTaRModule, parallel, parallel_thoughts
from lightning_tokens.quiet_star.attention import two_part_attention
from lightning_tokens.quiet_star.parallel import sample_tokens
from test_quiet_star import N_THOUGHTS, TALK, THOUGHT_LENGTH, TOL, naive_branch, run_passes
from test_quiet_star_attention import assert_equal_to_the_growing_cache, dense_reference
from test_quiet_star_generate import assert_generate_equals_naive

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


pytestmark = pytest.mark.filterwarnings("ignore")


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


def masked(logits: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    return logits.index_fill(-1, forbidden, float("-inf"))


# -- logits post-processing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(POST))
def test_loss_parts_come_from_the_models_own_logits(case):
    """Base NLL against the model's own CE; with the mixing weight at 1, the mixed NLL and the reward against the
    model's own logits of each talk step of the sequential re-run."""
    module = post_module(case)
    module.mixing_head.forward = lambda base, thought: (thought, torch.ones_like(thought[..., :1]))
    ids, mask = padded_rows([[5, 17, 33, 8, 90, 41, 7], [12, 250, 3, 64, 19]], 7, "right")
    out = module.quiet_star(ids, mask, temperature=0.0)
    lm, forbidden = module.lm, module.forbidden_ids

    with torch.no_grad():
        full = masked(lm(input_ids=ids, attention_mask=mask).logits, forbidden)
        hidden = decoder_of(lm)(input_ids=ids, attention_mask=mask).last_hidden_state
        bare = masked(lm.get_output_embeddings()(hidden), forbidden)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    base_nll = F.cross_entropy(full[:, :-1].transpose(1, 2), targets, ignore_index=-100).float()
    torch.testing.assert_close(out.base_nll, base_nll, **TOL)
    bare_nll = F.cross_entropy(bare[:, :-1].transpose(1, 2), targets, ignore_index=-100)
    assert abs(bare_nll - base_nll) > 1e-2, "the post-processing hardly matters here: the test would not see it"

    base_ce = F.cross_entropy(full[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    step_ce, rewards = {s: [] for s in range(TALK)}, []
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length - 1):
            future = ids[b, i + 1: min(length, i + TALK + 1)]
            with torch.no_grad():
                _, _, talk = naive_branch(module, ids[b, : i + 1], future)
            ce = [F.cross_entropy(masked(logits, forbidden), future[s]) for s, (logits, _) in enumerate(talk)]
            for s, value in enumerate(ce):
                step_ce[s].append(value)
            if len(ce) == TALK:
                rewards.append(sum(base_ce[b, i + s] - ce[s] for s in range(TALK)))
    mixed_nll = torch.stack([torch.stack(values).mean() for values in step_ce.values()]).mean()
    torch.testing.assert_close(out.mixed_nll, mixed_nll.float(), **TOL)
    torch.testing.assert_close(out.reward, torch.stack(rewards).mean().float(), **TOL)


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


def test_a_model_with_logits_post_processing_it_does_not_know_is_refused():
    module = family_module(dict(model_type="llama"))
    lm = module.lm
    lm.register_forward_hook(lambda _, args, output: output.__setitem__("logits", output.logits + 1.0))
    parallel._interface_checked.pop(lm, None)  # checked when the module was built, before the hook
    lean_loss._checked.discard(lm)
    with pytest.raises(ValueError, match="post-processes its logits"):
        parallel.check_supported(lm)


# -- soft-capped attention (Gemma 2) ----------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_soft_capped_two_part_attention_equals_dense_attention_and_its_gradients(fused):
    generator = torch.Generator().manual_seed(2)
    batch, n, kv_heads, groups, length, dim = 2, 2, 2, 2, 6, 4

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    query = rand(batch * n, kv_heads * groups, length, dim, scale=3.0)
    text_key, text_value = rand(batch, kv_heads, length, dim, scale=3.0), rand(batch, kv_heads, length, dim)
    keys = [rand(batch * n, kv_heads, length, dim, scale=3.0) for _ in range(2)]
    values = [rand(batch * n, kv_heads, length, dim) for _ in range(2)]
    allowed = torch.rand(batch, length, length, generator=generator) > 0.4
    allowed[1, 3] = False  # a query reading no text key
    inputs = [query, text_key, text_value, *keys, *values]
    out = two_part_attention(query, text_key, text_value, allowed, keys, values, 0.5, chunk=4, fused=fused, softcap=2.0)
    expected = dense_reference(query, text_key, text_value, allowed, keys, values, 0.5, softcap=2.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    uncapped = dense_reference(query, text_key, text_value, allowed, keys, values, 0.5)
    assert (uncapped - expected).abs().max() > 0.1, "scores too small for the cap to matter"
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


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


@pytest.mark.parametrize("case", list(WINDOWED))
def test_windowed_thoughtful_generate_equals_naive_recomputation(case):
    """Prompts of 6 tokens, 4 new ones and thoughts of 3: the window of 4 hides most of the text."""
    module = windowed_module(case).eval()
    assert_generate_equals_naive(module, [[1, 17, 25, 40, 9, 12], [1, 33, 8, 5]], 4)


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
