"""SFTDataModule(padding_free=True) and (eval_by_length=True): the same samples and results, less padding."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import CausalLMModule, ReasoningTask, SFTDataModule, TokenSelection
from lightning_tokens.data.packing import batch_is_packed, real_tokens, segment_ids
from lightning_tokens.modeling import ModelSpec
from tests.tiny import tiny_config


def data(**options) -> SFTDataModule:
    task = ReasoningTask(num_train=48, num_val=20, max_digits=3, max_operands=3, style="concise")
    module = SFTDataModule(task=task, batch_size=6, eval_batch_size=8, max_length=256, seed=5, **options)
    module.setup("fit")
    return module


def samples_of(batch: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(input_ids, labels)`` of every sample of a padded or packed batch, sorted; a sample's first label is
    left out (``-100`` in both layouts when the sample starts with a prompt, always ``-100`` when packed)."""
    if batch.get("attention_mask") is not None:
        real, segments = batch["attention_mask"].bool(), torch.zeros_like(batch["input_ids"])
    else:
        segments = segment_ids(batch["position_ids"])
        real = real_tokens(segments)
    found = []
    for ids, labels, keep, seg in zip(batch["input_ids"], batch["labels"], real, segments):
        for number in seg[keep].unique():
            part = keep & (seg == number)
            found.append((tuple(ids[part].tolist()), tuple(labels[part].tolist()[1:])))
    return sorted(found)


def test_each_padding_free_batch_holds_the_padded_batchs_samples_in_fewer_slots():
    padded, free = data(), data(padding_free=True)
    padded_batches, free_batches = list(padded.train_dataloader()), list(free.train_dataloader())
    assert len(free_batches) == len(padded_batches) == 8
    several_per_row = 0
    for a, b in zip(padded_batches, free_batches):
        assert batch_is_packed(b) and b.get("attention_mask") is None
        assert samples_of(b) == samples_of(a)
        assert b["input_ids"].shape[1] <= 256
        assert b["input_ids"].numel() < a["input_ids"].numel()
        several_per_row += int(b["input_ids"].shape[0] < a["input_ids"].shape[0])
    assert several_per_row == len(free_batches)


def test_packing_and_padding_free_exclude_each_other():
    with pytest.raises(ValueError, match="packing and padding_free"):
        SFTDataModule(packing=True, padding_free=True)


def initial_weights() -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(model=ModelSpec(config=tiny_config()), max_new_tokens=0)
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def fit(padding_free: bool, selection: bool) -> dict[str, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(model=ModelSpec(config=tiny_config()), max_new_tokens=0)
    callbacks = [TokenSelection(mode="sstoken", warmup=0.0, ratio=0.5)] if selection else []
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks)
    trainer.fit(module, datamodule=data(padding_free=padding_free))
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("selection", [False, True], ids=["plain", "sstoken"])
def test_padding_free_training_ends_where_padded_training_ends(selection):
    padded, free = fit(False, selection), fit(True, selection)
    moved = sum(float((padded[n] - p0).abs().sum()) for n, p0 in initial_weights().items())
    assert moved > 0  # the runs trained: equal weights are not two untouched models
    for name, weight in padded.items():
        torch.testing.assert_close(free[name], weight, rtol=0, atol=2e-5, msg=name)


def test_eval_by_length_batches_every_held_out_sample_once_shortest_first():
    plain, by_length = data(), data(eval_by_length=True)
    lengths = [int(m.sum()) for batch in by_length.val_dataloader() for m in batch["attention_mask"]]
    assert lengths == sorted(lengths) and len(lengths) == 20
    in_order = [int(m.sum()) for batch in plain.val_dataloader() for m in batch["attention_mask"]]
    assert in_order == [len(s.input_ids) for s in plain.val_dataset.samples] != lengths

    def answers(module):
        return sorted(a for batch in module.val_dataloader() for a in batch["answers"])

    assert answers(by_length) == answers(plain)


class Recorder(CausalLMModule):
    """Records each held-out prompt's greedy completion."""

    def _score_generations(self, batch, stage):
        completions = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        for ids, mask, completion in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], completions):
            self.seen[tuple(ids[mask.bool()].tolist())] = list(completion)
        super()._score_generations(batch, stage)


def test_eval_by_length_scores_the_same_completions_and_loss():
    results = []
    for by_length in (False, True):
        torch.manual_seed(0)
        module = Recorder(model=ModelSpec(config=tiny_config()), max_new_tokens=8)
        module.seen = {}
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
        metrics = trainer.validate(module, datamodule=data(eval_by_length=by_length), verbose=False)[0]
        results.append((module.seen, metrics))
    (seen, metrics), (seen_by_length, metrics_by_length) = results
    assert len(seen) == 20 and seen_by_length == seen
    assert metrics_by_length["val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-5)
    assert metrics_by_length["val/exact_match"] == metrics["val/exact_match"]


def test_eval_by_length_refuses_generating_only_some_batches():
    def validate(generation_batches):
        module = CausalLMModule(model=ModelSpec(config=tiny_config()), max_new_tokens=4,
                                generation_batches=generation_batches)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        return trainer.validate(module, datamodule=data(eval_by_length=True), verbose=False)[0]

    with pytest.raises(ValueError, match="generation_batches"):
        validate(1)
    module = CausalLMModule(model=ModelSpec(config=tiny_config()), max_new_tokens=4, generation_batches=1)
    tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="generation_batches"):
        tester.test(module, datamodule=data(eval_by_length=True), verbose=False)
    assert "val/exact_match" not in validate(0) and "val/loss" in validate(0)  # the loss pass alone is whole


def test_the_row_capacity_is_the_one_leaving_fewest_slots():
    from lightning_tokens.data.packing import PackedCollator, PaddingFreeCollator

    collator = PaddingFreeCollator(PackedCollator(pad_token_id=0), max_length=512)
    # One sample of 100 and fifteen of 60: padded, 16 x 100 = 1600 slots. Rows of at most 125 hold two 60s:
    # 8 rows of 120 and the 100 alone, 9 x 120 = 1080 slots. Rows of 200 (three 60s, or 100 + 60) tie at 6 x 180,
    # rows of 300 or 400 take 1200, rows of 512 take 3 x 480 = 1440; the smallest capacity wins the tie.
    lengths = [60] * 7 + [100] + [60] * 8
    rows = collator.rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(16))
    assert len(rows) == 9 and max(sum(lengths[i] for i in row) for row in rows) == 120
    # Equal lengths: nothing to gain, every sample keeps a row of its own.
    assert collator.rows([70] * 5) == [[0], [1], [2], [3], [4]]
