"""The ssToken protocol's runaway-selection additions: the variants (sstoken_variants.py), the clean-problem rows and
the runs planned with and without ``--seeds``, the audit's per-step trace, the detector rules and the package
detector's step read from each run's log (sstoken_runaway.py), and smoke runs of a variant row and of a clean row on
a tiny base.

The variants are checked against the package's own selection at the score's share of the budget, the trace
against means taken from the samples and their noise masks directly.
"""

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from experiments.protocols.noise import NoiseSettings, NoisySFTDataModule
from experiments.protocols.sstoken import (
    CLEAN_ROWS,
    DEFAULT_RUNS,
    METHODS,
    QUICK,
    ROWS,
    SETTINGS,
    VARIANTS,
    audit_callback,
    is_clean,
    planned_runs,
    row_change,
    run_one,
    selection_for,
    table,
)
from experiments.protocols.sstoken_runaway import firing_table, first_firing, load
from experiments.protocols.sstoken_variants import RandomShareSelection, RefreshedHistory, RefreshSelection
from lightning_tokens import ReasoningTask
from lightning_tokens.data.packing import real_tokens, segment_ids
from lightning_tokens.data.tokenizer import load_task_tokenizer
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from lightning_tokens.sstoken import TokenSelection
from lightning_tokens.sstoken.loss_table import sample_key
from tests.tiny import tiny_config


def _kept(selection, model, batch):
    """Positions (of the target token) each row keeps in one training forward with ``selection`` attached."""
    grabbed = {}

    class Grab:
        def reshape_token_loss(self, ctx):
            grabbed["weights"] = ctx.weights.clone()

    selection.attach(model)
    selection.dispatcher.add(Grab())
    model.train()
    model(**batch)
    selection.detach()
    return [set((row > 0).nonzero().flatten().add(1).tolist()) for row in grabbed["weights"]]


def _batch(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :12] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def test_random_share_fills_the_budget_at_random_outside_the_score():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("llama")))
    batch = _batch(model.config.vocab_size)
    scored = _kept(TokenSelection(mode="attention", ratio=0.6 * 0.7), model, batch)
    draws = [_kept(RandomShareSelection(0.3, mode="attention", seed=seed), model, batch) for seed in (0, 1)]
    for row, labels in enumerate(batch["labels"]):
        targets = set((labels != -100).nonzero().flatten().tolist())
        for kept in draws:
            assert scored[row] < kept[row] <= targets
            assert len(kept[row]) == math.ceil(0.6 * len(targets))
    assert draws[0] != draws[1]  # the share is drawn, not taken in order
    with pytest.raises(ValueError, match="share"):
        RandomShareSelection(1.0)


def test_refreshed_history_copies_the_weights_every_n_steps_only():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("llama")))
    history = RefreshedHistory(every=3)
    history.setup(model, None, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    held = [p.detach().clone() for p in params]
    for step in range(1, 8):
        with torch.no_grad():
            for p in params:
                p.add_(0.01 * step)
        history.after_optimizer_step(model)
        if step % 3 == 0:
            held = [p.detach().clone() for p in params]
        assert all(torch.equal(s, h) for s, h in zip(history.shadow, held)), step
    with pytest.raises(ValueError, match="every"):
        RefreshedHistory(0)


def test_variant_rows_build_what_they_name():
    assert selection_for("sft@lr1e-4", 0, None) is None and VARIANTS["sft@lr1e-4"]["lr"] == 1e-4
    ema = selection_for("sstoken-ema0.9", 0, None)
    assert (ema.history, ema.ema_decay, ema.mode) == ("ema", 0.9, "sstoken")
    refresh = selection_for("sstoken-refresh16", 0, None)
    assert isinstance(refresh, RefreshSelection) and refresh.every == 16 and refresh.history == "ema"
    random = selection_for("sstoken-random30", 2, None)
    assert isinstance(random, RandomShareSelection) and random.share == 0.3 and random.seed == 2
    assert type(selection_for("sstoken", 0, None)) is TokenSelection


def test_clean_rows_run_their_noisy_row_on_the_clean_problems():
    assert len(CLEAN_ROWS) == len(VARIANTS) + 2 and all(is_clean(row) for row in CLEAN_ROWS)
    assert not any(is_clean(row) for row in ("base", *METHODS, *VARIANTS))
    assert row_change("clean_sft@lr1e-4") == {"mode": "sft", "lr": 1e-4}
    assert selection_for("clean_sft@lr1e-4", 0, None) is None and selection_for("clean", 0, None) is None
    ema = selection_for("clean_sstoken-ema0.9", 1, None)
    assert (ema.history, ema.ema_decay, ema.mode, ema.seed) == ("ema", 0.9, "sstoken", 1)
    assert selection_for("clean_sstoken-fallback", 0, None).on_runaway == "attention"
    assert isinstance(selection_for("clean_sstoken-refresh16", 0, None), RefreshSelection)
    assert type(selection_for("clean_sstoken", 0, None)) is TokenSelection


def test_default_plan_has_as_many_runs_as_the_timed_part_had_and_seeds_run_every_row():
    default = planned_runs()
    assert len(default) == DEFAULT_RUNS == 5 * 6 + 3  # 5 seeds of the 6 methods and 3 references, timed at 68.8 min
    assert len(set(default)) == len(default) and default[-1] == ("base", 0)
    assert {row for row, _ in default} >= {*METHODS, *VARIANTS, "clean", "clean_sstoken", "base"}
    every = planned_runs([3, 4])
    expected = {(row, seed) for row in ROWS if row != "base" for seed in (3, 4)} | {("base", 0)}
    assert set(every) == expected and len(every) == len(expected)
    last_noisy = max(i for i, (row, _) in enumerate(every) if row != "base" and not is_clean(row))
    assert all(is_clean(row) for row, _ in every[last_noisy + 1:-1])  # the noisy rows of every seed first
    assert [seed for row, seed in every if row == "sstoken"] == [3, 4]


def test_audit_trace_is_the_mean_loss_of_kept_and_dropped_tokens_per_optimizer_step():
    """Four padding-free forwards accumulated into one optimizer step, a per-token loss and a keep rule known
    per token (loss 1 + id % 7, even ids kept), a negative REL share per forward: the step's figures equal the
    means taken from the samples directly."""
    task = ReasoningTask.preset("medium", style="concise", num_train=32, num_val=4, seed=900)
    noise = NoiseSettings(noisy_fraction=0.5, spans=3, span_length=6, digit_rate=0.3)
    data = NoisySFTDataModule(noise=noise, noise_seed=3, task=task, max_length=512, batch_size=8, padding_free=True)
    data.tokenizer = load_task_tokenizer()
    data.setup("fit")
    selection = SimpleNamespace(metrics={})
    audit = audit_callback(data.noise_masks, selection)
    negative, responses = [], []
    for number, batch in enumerate(data.train_dataloader()):
        segments = segment_ids(batch["position_ids"])
        target_mask = batch["labels"][:, 1:] != -100
        token = batch["input_ids"][:, 1:]
        selection.metrics = {"negative_rel": torch.tensor(0.1 * number)}
        negative.append(0.1 * number)
        responses.append(int(target_mask.sum()))
        audit.reshape_token_loss(SimpleNamespace(
            input_ids=batch["input_ids"], labels=batch["labels"], segments=segments, target_mask=target_mask,
            attention_mask=real_tokens(segments), token_loss=(1.0 + token % 7) * target_mask,
            weights=(target_mask & (token % 2 == 0)).float()))
        audit.on_train_batch_end(SimpleNamespace(global_step=0), None, None, batch, number)  # accumulating
    assert audit.trace["step"] == []
    audit.on_train_batch_end(SimpleNamespace(global_step=1), None, None, None, number)
    losses = {name: [] for name in ("loss_kept", "loss_dropped", "noise_kept", "noise_dropped", "clean_kept",
                                    "clean_dropped")}
    for sample in data.train_dataset.samples:
        flags = data.noise_masks.get(sample_key(sample.input_ids, sample.labels))
        targets = [t for t, label in zip(sample.input_ids, sample.labels) if label != -100]
        for i, t in enumerate(targets):
            kept = "kept" if t % 2 == 0 else "dropped"
            losses["loss_" + kept].append(1.0 + t % 7)
            if flags is not None:
                losses[("noise_" if flags[i] else "clean_") + kept].append(1.0 + t % 7)
    assert audit.trace["step"] == [1]
    for name, values in losses.items():
        assert audit.trace[name] == [pytest.approx(statistics.mean(values))], name
    share = sum(v * n for v, n in zip(negative, responses)) / sum(responses)
    assert audit.trace["negative_rel"] == [pytest.approx(share)]


def test_rules_fire_where_the_dropped_loss_rises_and_the_kept_loss_does_not():
    # warm-up 2 steps, baseline steps 3-6 (kept 1, dropped 2), then the dropped loss rises 0.5 a step
    steps = list(range(1, 21))
    dropped = [2.0 if s <= 6 else 2.0 + 0.5 * (s - 6) for s in steps]
    trace = dict(step=steps, loss_kept=[1.0 if s <= 6 else 0.9 for s in steps], loss_dropped=dropped)
    assert first_firing(trace, 2, window=4, rise=0.5) == 8  # 2 + 0.5 * 2 = 3 = 1.5 x 2
    assert first_firing(trace, 2, window=4, rise=0.5, mean=True) == 10  # mean of steps 7-10: 3.25; 6-9: 2.75
    rising = dict(trace, loss_kept=[1.0 if s <= 6 else 1.1 for s in steps])  # a learning rate too high
    assert first_firing(rising, 2, window=4, rise=0.5) is None
    no_drop = dict(trace, loss_dropped=[None] * len(steps))  # full SFT drops nothing
    assert first_firing(no_drop, 2, window=4, rise=0.5) is None


def test_the_package_detector_step_is_read_from_each_run_log(tmp_path):
    trace = dict(step=[1, 2], loss_kept=[1.0, 1.0], loss_dropped=[2.0, 2.0])
    for name, log in (("sstoken-0", "x\nUserWarning: Runaway selection at step 31: over the last 8 steps\n"
                                    "Runaway selection at step 40\n"), ("sft-0", "nothing\n"), ("rho1-0", None)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(method=name[:-2], seed=0, steps=64, val_loss=0.2,
                                                                trace=trace)))
        if log is not None:
            (tmp_path / f"{name}.log").write_text(log)
    (tmp_path / "settings.json").write_text("{}")
    runs = {run["method"]: run["detector"] for run in load(tmp_path)}
    assert runs == {"sstoken": 31, "sft": None, "rho1": None}
    assert "| sstoken-0 | 0.200 | 31 |" in firing_table(load(tmp_path))


def test_table_has_the_variant_rows():
    rows = [dict(method=m, seed=s, exact_match=0.05 + 0.01 * s, val_loss=0.2, kept_noise=0.5, kept_clean=0.6)
            for m in ("sstoken", "sstoken-ema0.9", "clean_sstoken-ema0.9") for s in (0, 1)]
    noisy, clean = table(rows).split("\n\n")
    assert ("| sstoken-ema0.9 | ssToken, EMA history 0.9 | 5.5 ± 0.7 | 5.0, 6.0 | 0.200 ± 0.000 | 0.50 / 0.60 |"
            in noisy.splitlines())
    assert "clean_" not in noisy and "ema0.9 |" not in clean.replace("clean_sstoken-ema0.9 |", "")
    assert ("| clean_sstoken-ema0.9 | ssToken, EMA history 0.9 | 5.5 ± 0.7 | 5.0, 6.0 | 0.200 ± 0.000 |"
            in clean.splitlines())  # no noise to count


#: The protocol at smoke sizes, on a tiny base: 2 steps, 4 held-out problems.
TINY_SETTINGS = {**SETTINGS, **QUICK, "num_eval": 4, "max_new_tokens": 4}


@pytest.fixture
def tiny_base(tmp_path):
    """A tiny random Llama with the task's tokenizer, saved as a base folder."""
    tokenizer = load_task_tokenizer()
    config = tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model, _ = load_causal_lm(ModelSpec(config=config))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def test_a_variant_row_runs_end_to_end_and_traces_every_step(tiny_base):
    result = run_one("sstoken-random30", 0, tiny_base, TINY_SETTINGS)
    assert result["steps"] == 2 and result["trace"]["step"] == [1, 2]
    assert all(len(v) == 2 and None not in v for v in result["trace"].values())
    assert 0 < result["kept_noise"] < 1 and 0 < result["kept_clean"] < 1


def test_a_clean_row_trains_without_noise(tiny_base):
    result = run_one("clean_sstoken@lr1e-4", 0, tiny_base, TINY_SETTINGS)
    assert result["steps"] == 2 and result["noise_tokens"] == 0 and result["clean_tokens"] == 0  # no noisy sample
    assert all(v is not None for v in result["trace"]["loss_kept"])
