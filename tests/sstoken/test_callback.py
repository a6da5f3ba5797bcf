"""TokenSelection (sstoken/callback.py) on one forward: the kept set and loss of every mode against naive formulas,
gamma and warmup, edge cases, argument checks, and the warmup length a resumed run keeps."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.sstoken import TokenSelection
from tests.integration.architectures import spec_of
from tests.sstoken.helpers import build, perturb, run_selection
from tests.sstoken.naive import make_batch, naive_attention, naive_loss, naive_select, naive_token_losses
from tests.tiny import tiny_config


@pytest.mark.parametrize("model_type,left_pad,layer", [("llama", False, -1), ("qwen2", True, 0),
                                                       ("mistral", False, 1), ("gpt2", True, -1)])
def test_kept_set_and_loss_match_naive_formulas(model_type, left_pad, layer):
    model = build(model_type)
    base = copy.deepcopy(model)
    selection = TokenSelection(ratio=0.6, gamma=0.5, warmup=0, attention_layer=layer)
    selection.attach(model)  # the frozen copy is taken here, from the initial weights
    selection.detach()
    perturb(model)
    batch = make_batch(causal_lm_of(model).config.vocab_size, left_pad=left_pad)
    his, cur = naive_token_losses(base, batch), naive_token_losses(model, batch)
    rel = [{i: h[i] - c[i] for i in h} for h, c in zip(his, cur)]
    attn = naive_attention(model, batch, layer)
    expected = naive_select(rel, attn, 0.5, 0.6)
    loss, kept = run_selection(selection, model, batch)
    assert kept == expected
    assert [len(k) for k in kept] == [5, 2, 4, 3]  # ceil(0.6 * n)
    assert loss.item() == pytest.approx(naive_loss(model, batch, kept), rel=1e-5)


@pytest.mark.parametrize("gamma,mode", [(1.0, "loss"), (0.0, "attention")])
def test_gamma_extremes_reduce_to_single_signal_modes(gamma, mode):
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    mixed = TokenSelection(gamma=gamma, warmup=0)
    mixed.attach(model)
    mixed.detach()
    single = TokenSelection(mode=mode)
    single.attach(model)
    single.detach()
    perturb(model)
    loss_a, kept_a = run_selection(mixed, model, batch)
    loss_b, kept_b = run_selection(single, model, batch)
    assert kept_a == kept_b
    torch.testing.assert_close(loss_a, loss_b)
    # and each really is the single signal: compare with the naive selection of that signal alone
    attn = naive_attention(model, batch, -1)
    if mode == "attention":
        assert kept_b == naive_select([{i: 0.0 for i in a} for a in attn], attn, 0.0, 0.6)


def test_warmup_uses_attention_only_then_mixes():
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    selection = TokenSelection(gamma=0.5, warmup=3)
    attention_only = TokenSelection(mode="attention")
    selection.attach(model)
    selection.detach()
    perturb(model)
    selection.global_step = 2
    assert selection.current_gamma() == 0.0
    _, kept_warm = run_selection(selection, model, batch)
    _, kept_attn = run_selection(attention_only, model, batch)
    assert kept_warm == kept_attn
    selection.global_step = 3
    assert selection.current_gamma() == 0.5


def test_edge_cases_no_nan():
    """Samples with 0 and 1 response tokens, a padding-only row and ties: finite loss, sane selection."""
    model = build("llama")
    ids = torch.randint(5, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0] = -100  # no response tokens
    labels[1, :7] = -100  # one response token (the last)
    mask[2] = 0  # padding only
    labels[2] = -100
    labels[3, :2] = -100
    ids[3, 2:] = ids[3, 2]  # repeated tokens: ties in both signals
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for mode in ("sstoken", "loss", "attention", "random"):
        selection = TokenSelection(mode=mode, warmup=0)
        loss, kept = run_selection(selection, model, batch)
        assert torch.isfinite(loss), mode
        assert [len(k) for k in kept] == [0, 1, 0, 4], mode
        # rank_corr is NaN when no sample has 2 varying tokens; it is then left out of the logs
        assert all(torch.isfinite(v) for k, v in selection.metrics.items() if k != "rank_corr")
    # a micro-batch without any response token: loss 0, not NaN
    empty = {**batch, "labels": torch.full_like(labels, -100)}
    loss, _ = run_selection(TokenSelection(warmup=0), model, empty)
    assert loss.item() == 0.0


def test_random_mode_keeps_ceil_ratio_per_sample():
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    _, kept_a = run_selection(TokenSelection(mode="random", ratio=0.5), model, batch)
    _, kept_b = run_selection(TokenSelection(mode="random", ratio=0.5, seed=1), model, batch)
    assert [len(k) for k in kept_a] == [math.ceil(0.5 * n) for n in (7, 2, 6, 5)]
    assert kept_a != kept_b


def test_rho1_keeps_top_excess_loss_under_reference():
    spec = ModelSpec(config=tiny_config("llama"), seed=5)
    reference = causal_lm_of(load_causal_lm(spec)[0])
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    ref, cur = naive_token_losses(reference, batch), naive_token_losses(model, batch)
    excess = [{i: c[i] - r[i] for i in c} for c, r in zip(cur, ref)]
    expected = [set(sorted(e, key=lambda i: (-e[i], i))[:math.ceil(0.6 * len(e))]) for e in excess]
    _, kept = run_selection(TokenSelection(mode="rho1", reference=spec), model, batch)
    assert kept == expected


@pytest.mark.parametrize("kwargs,field", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(gamma=-0.1), "gamma"),
    (dict(mode="rho2"), "mode"), (dict(history="future"), "history"), (dict(history="precomputed"), "history_file"),
    (dict(mode="rho1"), "reference"), (dict(ema_decay=1.0), "ema_decay"), (dict(warmup=-1), "warmup"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TokenSelection.{field}"):
        TokenSelection(**kwargs)


@pytest.mark.parametrize("case", ["falcon", "gptj", "bloom", "mpt"])
def test_loss_mode_selects_by_excess_loss_on_any_attention(case):
    model = causal_lm_of(load_causal_lm(spec_of(case))[0])
    base = copy.deepcopy(model)
    selection = TokenSelection(ratio=0.6, mode="loss")
    selection.attach(model)  # the frozen copy is taken here, from the initial weights
    selection.detach()
    perturb(model)
    batch = make_batch(model.config.vocab_size)
    his, cur = naive_token_losses(base, batch), naive_token_losses(model, batch)
    rel = [{i: h[i] - c[i] for i in h} for h, c in zip(his, cur)]
    loss, kept = run_selection(selection, model, batch)
    assert kept == naive_select(rel, [{i: 0.0 for i in r} for r in rel], 1.0, 0.6)
    assert loss.item() == pytest.approx(naive_loss(model, batch, kept), rel=1e-5)


def test_a_resumed_run_keeps_its_warmup_length():
    from types import SimpleNamespace

    fresh, resumed = TokenSelection(mode="attention", warmup=0.5), TokenSelection(mode="attention", warmup=0.5)
    trainer = SimpleNamespace(estimated_stepping_batches=40, global_step=0)
    fresh.on_train_start(trainer, None)
    assert fresh.warmup_steps == 20
    resumed.load_state_dict({"global_step": 3, "forwards": 3, "warmup_steps": 7})
    resumed.on_train_start(SimpleNamespace(estimated_stepping_batches=40, global_step=3), None)
    assert resumed.warmup_steps == 7 and resumed.global_step == 3
