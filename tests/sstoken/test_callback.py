"""TokenSelection (sstoken/callback.py) on one forward: the kept set and loss of every mode against naive formulas,
gamma and warmup, edge cases, argument checks, and the warmup length a resumed run keeps; the kept/dropped loss and
negative-REL diagnostics against naive values, and runaway selection acted on in tiny looping and healthy runs."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.sstoken import TokenSelection
from tests.integration.architectures import spec_of
from tests.sstoken.helpers import build, lora_spec, perturb, run_selection
from tests.sstoken.naive import make_batch, naive_attention, naive_loss, naive_select, naive_token_losses
from tests.tiny import tiny_config, trainer


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


# -- diagnostics and runaway selection ---------------------------------------------------------------------------


def packed_version(batch):
    """``batch``'s samples packed two per row (position_ids restarting at 0), as PackedCollator builds them."""
    from lightning_tokens.data.encode import Encoded
    from lightning_tokens.data.packing import PackedCollator

    samples = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = mask.bool()
        samples.append(Encoded(ids[real].tolist(), labels[real].tolist(), int((labels[real] == -100).sum()), "test"))
    return PackedCollator(pad_token_id=0)([samples[:2], samples[2:]])


@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_kept_dropped_and_negative_rel_diagnostics_match_naive_values(layout):
    model = build("llama")
    base = copy.deepcopy(model)
    selection = TokenSelection(ratio=0.6, gamma=0.5, warmup=0)
    selection.attach(model)
    selection.detach()
    perturb(model)
    padded = make_batch(causal_lm_of(model).config.vocab_size, left_pad=layout == "left")
    his, cur = naive_token_losses(base, padded), naive_token_losses(model, padded)
    kept = naive_select([{i: h[i] - c[i] for i in h} for h, c in zip(his, cur)], naive_attention(model, padded, -1),
                        0.5, 0.6)
    kept_values = [cur[b][i] for b in range(4) for i in kept[b]]
    dropped_values = [cur[b][i] for b in range(4) for i in cur[b] if i not in kept[b]]
    negative = sum(his[b][i] < cur[b][i] for b in range(4) for i in cur[b])
    run_selection(selection, model, packed_version(padded) if layout == "packed" else padded)
    metrics = {k: v.item() for k, v in selection.metrics.items()}
    assert metrics["loss_kept"] == pytest.approx(sum(kept_values) / len(kept_values), rel=1e-5)
    assert metrics["loss_dropped"] == pytest.approx(sum(dropped_values) / len(dropped_values), rel=1e-5)
    assert metrics["negative_rel"] == pytest.approx(negative / (len(kept_values) + len(dropped_values)))
    assert 0 < negative < len(kept_values) + len(dropped_values)  # the batch tests both sides of REL < 0


@pytest.mark.parametrize("family,left_pad", [("deepseek_v3", True), ("glm4_moe", False), ("nf4-lora", True),
                                             ("nf4-lora", False)])
def test_diagnostics_match_naive_values_on_moe_mla_and_nf4_lora(family, left_pad):
    """MoE with DeepSeek-style attention (deepseek_v3), MoE (glm4_moe): ssToken's mix, history a frozen copy. QLoRA
    (nf4 base, LoRA adapters): REL alone, history the base with the adapters disabled."""
    if family == "nf4-lora":
        model, _ = load_causal_lm(lora_spec(quantization="nf4"))
        selection = TokenSelection(mode="loss", ratio=0.6)
        batch = make_batch(causal_lm_of(model).config.vocab_size, left_pad=left_pad)
        cur = naive_token_losses(model, batch)
        with model.disable_adapter():
            his = naive_token_losses(model, batch)
        attention, gamma = None, 1.0
    else:
        model = build(family)
        base = copy.deepcopy(model)
        selection = TokenSelection(ratio=0.6, gamma=0.5, warmup=0)
        selection.attach(model)  # the frozen copy: the weights before the perturbation
        selection.detach()
        perturb(model)
        batch = make_batch(causal_lm_of(model).config.vocab_size, left_pad=left_pad)
        his, cur = naive_token_losses(base, batch), naive_token_losses(model, batch)
        attention, gamma = naive_attention(model, batch, -1), 0.5
    rel = [{i: h[i] - c[i] for i in h} for h, c in zip(his, cur)]
    kept = naive_select(rel, attention or rel, gamma, 0.6)
    kept_values = [cur[b][i] for b in range(4) for i in kept[b]]
    dropped_values = [cur[b][i] for b in range(4) for i in cur[b] if i not in kept[b]]
    negative = sum(r < 0 for row in rel for r in row.values())
    _, selected = run_selection(selection, model, batch)
    metrics = {k: v.item() for k, v in selection.metrics.items()}
    assert selected == kept
    assert metrics["loss_kept"] == pytest.approx(sum(kept_values) / len(kept_values), rel=1e-4)
    assert metrics["loss_dropped"] == pytest.approx(sum(dropped_values) / len(dropped_values), rel=1e-4)
    assert metrics["negative_rel"] == pytest.approx(negative / (len(kept_values) + len(dropped_values)))
    assert 0 < negative < len(kept_values) + len(dropped_values)


def test_negative_rel_only_where_rel_is_computed():
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    spec = ModelSpec(config=tiny_config("llama"), seed=5)
    for selection, has_rel in ((TokenSelection(mode="rho1", reference=spec), False),
                               (TokenSelection(warmup=5), False), (TokenSelection(mode="attention"), False),
                               (TokenSelection(mode="loss"), True)):
        run_selection(selection, model, batch)
        assert ("negative_rel" in selection.metrics) == has_rel, selection.mode
        assert {"loss_kept", "loss_dropped"} <= set(selection.metrics)


FILLER = 3  # one token id the responses repeat: learnt at once, so REL ranks it first


def looping_data(n=64, seed=0):
    """Responses of 12 tokens: the prompt's 6 tokens reversed (slow to learn) and 6 filler tokens, shuffled."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(10, 64, (6,), generator=g)
        response = torch.cat([prompt.flip(0), torch.full((6,), FILLER)])[torch.randperm(12, generator=g)]
        ids = torch.cat([prompt, response])
        labels = ids.clone()
        labels[:6] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return torch.utils.data.DataLoader(rows, batch_size=8)


class LoopModule(pl.LightningModule):
    def __init__(self, lr):
        super().__init__()
        self.lr = lr
        self.net = causal_lm_of(load_causal_lm(ModelSpec(config=tiny_config("llama", vocab_size=64)))[0])

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class StepRecorder(pl.Callback):
    """The ``selection/`` metrics of every step (one micro-batch per step)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k.removeprefix("selection/"): float(v) for k, v in trainer.callback_metrics.items()
                           if k.startswith("selection/")})


def loop_run(selection, lr=1e-2, steps=24, ckpt_path=None, **kwargs):
    recorder = StepRecorder()
    fit = trainer(max_steps=steps, callbacks=[selection, recorder], **kwargs)
    fit.fit(LoopModule(lr), looping_data(), ckpt_path=ckpt_path)
    return fit, recorder.steps


def first_step_the_rule_holds(steps, window, rise):
    """A naive reading of the rule on the logged per-step losses: the first step (1-based) at which the mean over the
    last ``window`` steps has dropped >= (1 + rise) x the first ``window`` steps' mean and kept <= theirs."""
    kept, dropped = [s["loss_kept"] for s in steps], [s["loss_dropped"] for s in steps]
    base_kept, base_dropped = sum(kept[:window]) / window, sum(dropped[:window]) / window
    for t in range(window + 1, len(steps) + 1):
        now_kept, now_dropped = sum(kept[t - window:t]) / window, sum(dropped[t - window:t]) / window
        if now_dropped >= (1 + rise) * base_dropped and now_kept <= base_kept:
            return t
    return None


def test_a_looping_run_warns_once_at_the_step_the_rule_first_holds():
    selection = TokenSelection(mode="loss", runaway_window=4, runaway_rise=0.5)
    with pytest.warns(UserWarning, match="Runaway selection") as caught:
        _, steps = loop_run(selection)
    warned = [w for w in caught if "Runaway selection" in str(w.message)]
    assert len(warned) == 1
    expected = first_step_the_rule_holds(steps, 4, 0.5)
    assert expected is not None and selection.detector.fired_step == expected
    assert f"at step {expected}:" in str(warned[0].message) and "mode='rho1'" in str(warned[0].message)
    assert [s["runaway"] for s in steps] == [0.0] * (expected - 1) + [1.0] * (len(steps) - expected + 1)


def test_a_looping_run_raises_runaway_selection():
    from lightning_tokens import RunawaySelection

    with pytest.raises(RunawaySelection, match="Runaway selection at step [0-9]+:.*negative REL"):
        loop_run(TokenSelection(mode="loss", runaway_window=4, on_runaway="raise"))
    assert issubclass(RunawaySelection, RuntimeError)


@pytest.mark.parametrize("mode", ["loss", "sstoken"])
def test_on_runaway_attention_selects_by_attention_alone_after_firing(mode):
    selection = TokenSelection(mode=mode, warmup=0, runaway_window=4, on_runaway="attention")
    with pytest.warns(UserWarning, match="attention alone"):
        _, steps = loop_run(selection, steps=30)
    fired = selection.detector.fired_step
    assert fired is not None
    gamma = 1.0 if mode == "loss" else 0.5
    assert [s["gamma"] for s in steps] == [gamma] * fired + [0.0] * (len(steps) - fired)
    assert selection.current_gamma() == 0.0


class LoggingLoopModule(LoopModule):
    """LoopModule keeping what each step logs."""

    def __init__(self, lr):
        super().__init__(lr)
        self.logged = []

    def log_dict(self, values, *args, **kwargs):
        self.logged.append(dict(values))
        super().log_dict(values, *args, **kwargs)


def test_the_runaway_flag_is_logged_on_the_watched_steps_and_every_step_after_firing():
    selection = TokenSelection(mode="loss", warmup=0, runaway_window=4, on_runaway="attention")
    module = LoggingLoopModule(1e-2)
    with pytest.warns(UserWarning, match="attention alone"):
        trainer(max_steps=30, callbacks=[selection]).fit(module, looping_data())
    fired = selection.detector.fired_step
    assert fired is not None and len(module.logged) == 30
    flags = [step.get("selection/runaway") for step in module.logged]
    assert flags == [0.0] * (fired - 1) + [1.0] * (30 - fired + 1)
    rel = ["selection/negative_rel" in step for step in module.logged]
    assert rel == [True] * fired + [False] * (30 - fired)  # attention alone after the step it fired at


@pytest.mark.parametrize("mode,lr", [("attention", 1e-2), ("random", 1e-2), ("rho1", 1e-2), ("sstoken", 1e-4)])
def test_healthy_runs_never_fire(mode, lr):
    reference = ModelSpec(config=tiny_config("llama", vocab_size=64), seed=5)
    selection = TokenSelection(mode=mode, warmup=0.2, reference=reference, runaway_window=4)
    _, steps = loop_run(selection, lr=lr, steps=30)
    assert not selection.detector.fired
    runaway = [s["runaway"] for s in steps if "runaway" in s]
    assert runaway == ([0.0] * 24 if mode == "sstoken" else [])  # logged after the warm-up (6 of 30 steps) only


def test_a_run_all_in_warm_up_is_not_watched():
    selection = TokenSelection(warmup=100, runaway_window=4)
    _, steps = loop_run(selection, steps=16)
    assert selection.detector.baseline is None and not selection.detector.first
    assert not any("runaway" in s or "negative_rel" in s for s in steps)


def test_an_empty_dropped_set_is_left_out_not_logged_as_nan():
    _, steps = loop_run(TokenSelection(mode="loss", ratio=1.0), steps=2)
    assert all("loss_dropped" not in s and math.isfinite(s["loss_kept"]) for s in steps)


def test_a_resumed_run_detects_runaway_at_the_same_step(tmp_path):
    import warnings

    def selection():
        return TokenSelection(mode="loss", runaway_window=4, runaway_rise=0.5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = selection()
        loop_run(straight, steps=-1, max_epochs=3)  # 8 steps an epoch: a cut at an epoch's end resumes exactly
        first = selection()
        fit, _ = loop_run(first, steps=-1, max_epochs=1)
        assert first.detector.baseline is not None and not first.detector.fired  # cut between baseline and firing
        fit.save_checkpoint(tmp_path / "cut.ckpt")
        resumed = selection()
        loop_run(resumed, steps=-1, max_epochs=3, ckpt_path=tmp_path / "cut.ckpt")
    assert straight.detector.fired_step is not None
    assert resumed.detector.state_dict() == straight.detector.state_dict()


@pytest.mark.parametrize("kwargs,field", [(dict(on_runaway="ignore"), "on_runaway"),
                                          (dict(runaway_window=0), "runaway_window"),
                                          (dict(runaway_rise=-1), "runaway_rise")])
def test_bad_runaway_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TokenSelection.{field}"):
        TokenSelection(**kwargs)
