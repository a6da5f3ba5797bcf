"""Padding-free packing: the row packer, the collator, and packed rows computing each sample as if alone."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from lightning_tokens.data.packing import (
    PackedCollator,
    PackedRows,
    PackingError,
    SampleView,
    batch_is_packed,
    flash_attention_kwargs,
    model_inputs,
    pack_lengths,
    real_token_count,
    real_tokens,
    segment_ids,
)
from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher
from tests.data.builders import sample, tiny_model

ARCHITECTURES = ["llama", "qwen2", "mistral", "gpt2"]


# -- the packer ---------------------------------------------------------------------------------------
def test_pack_lengths_places_every_sample_once_within_capacity():
    lengths = [random.Random(i).randrange(1, 40) for i in range(300)]
    rows = pack_lengths(lengths, 64)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # best-fit decreasing is within 11/9 OPT + 1 rows; the total length bounds OPT from below
    assert len(rows) <= 11 / 9 * -(-sum(lengths) // 64) + 1
    assert pack_lengths(lengths, 64) == rows  # deterministic


def test_pack_lengths_best_fit_and_oversized():
    # longest first: 5 opens row 0 (space 3), 4 opens row 1 (space 4), 3 fills row 0 exactly, 1 goes to row 1
    assert pack_lengths([5, 4, 3, 1], 8) == [[0, 2], [1, 3]]
    # best fit, not first fit: after 12 | 9 + 9 the rows have 8 and 2 left, and 2 goes to the fuller row
    assert pack_lengths([12, 9, 9, 2], 20) == [[0], [1, 2, 3]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_lengths([3, 9], 8)


def test_collator_restarts_positions_and_masks_each_first_token():
    samples = [sample(5, 2, 0), sample(4, 1, 1), sample(6, 3, 2)]
    batch = PackedCollator(pad_token_id=0)([[samples[0], samples[1]], [samples[2]]])
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    assert batch["input_ids"].shape == (2, 9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 0]]
    assert batch["input_ids"][0].tolist() == samples[0].input_ids + samples[1].input_ids
    assert batch["labels"][0].tolist() == [-100] + samples[0].labels[1:] + [-100] + samples[1].labels[1:]
    assert batch["labels"][1].tolist() == samples[2].labels + [-100] * 3
    assert segment_ids(batch["position_ids"]).tolist() == [[0] * 5 + [1] * 4, [0] * 6 + [1, 2, 3]]
    assert real_tokens(segment_ids(batch["position_ids"])).sum() == 15 == real_token_count(batch)
    assert batch_is_packed(batch) and not batch_is_packed({**batch, "attention_mask": torch.ones(2, 9)})
    assert "labels" not in model_inputs(batch, labels=False)


def test_flash_attention_kwargs_match_transformers_own_derivation():
    samples = [sample(n, 1, n) for n in (5, 4, 6, 3, 2)]
    batch = PackedCollator(pad_token_id=0, flash_attention=True)([[samples[0], samples[1]], [samples[2]], samples[3:]])
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert batch["max_length_q"] == int(max_q) == batch["max_length_k"] == 6


def test_packed_rows_dataset_fill():
    data = [(sample(n, 1, n), None) for n in (10, 6, 4, 3, 9)]
    rows = PackedRows(data, max_length=16)
    assert sorted(len(item[0].input_ids) for row in rows for item in row) == [3, 4, 6, 9, 10]
    assert rows.fill == pytest.approx(32 / (16 * len(rows)))


def test_sample_view_groups_by_sample():
    response = torch.tensor([[True, True, False, True, True], [True, False, False, False, False]])
    segments = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 2, 3]])
    view = SampleView(response, segments)
    assert view.rows.tolist() == [0, 0, 1]
    assert view.response.long().tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 0]]
    values = torch.arange(10.0).view(2, 5)
    assert torch.equal(view.collapse(view.expand(values)), values * response)


# -- packed rows compute each sample as if it were alone -----------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_packed_logits_equal_each_sample_alone(model_type, attention):
    model = tiny_model(model_type, attention)
    rows = [[sample(7, 2, 0), sample(5, 1, 1), sample(9, 3, 2)], [sample(12, 4, 3), sample(6, 2, 4)]]
    batch = PackedCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        packed = model(**model_inputs(batch, labels=False)).logits
        for r, row in enumerate(rows):
            start = 0
            for item in row:
                n = len(item.input_ids)
                alone = model(input_ids=torch.tensor([item.input_ids])).logits[0]
                torch.testing.assert_close(packed[r, start:start + n], alone, atol=1e-5, rtol=1e-5)
                start += n


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_dispatched_packed_forward_runs_without_cache_and_matches_padded_loss(model_type):
    """Through the dispatcher (training mode, labels), a packed batch gives the loss of the same samples padded."""
    model = tiny_model(model_type, "sdpa").train()
    model.config.use_cache = True  # the dispatcher must still turn the cache off
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    samples = [sample(7, 2, 0), sample(5, 1, 1), sample(9, 3, 2), sample(4, 1, 5)]
    packed = PackedCollator(pad_token_id=0)([[samples[0], samples[1]], [samples[2], samples[3]]])
    packed.pop("use_cache")
    dispatcher = TokenLossDispatcher.for_model(model)
    handler = PlainLoss()
    dispatcher.add(handler)
    try:
        loss = model(**packed).loss
        width = max(len(s.input_ids) for s in samples)
        ids = torch.zeros(4, width, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(s.input_ids), 1, torch.tensor(s.labels)
        dispatcher.remove(handler)
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' own loss
    finally:
        dispatcher.remove(handler)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_dispatcher_refuses_packed_rows_with_a_2d_mask_and_packed_batches_without_positions():
    model = tiny_model("llama", "sdpa").train()
    batch = PackedCollator(pad_token_id=0)([[sample(5, 1, 0), sample(4, 1, 1)]])
    dispatcher = TokenLossDispatcher.for_model(model)
    handler = PlainLoss()
    dispatcher.add(handler)
    try:
        with pytest.raises(PackingError, match="2D attention_mask"):
            model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
        dispatcher.expect_packed = True
        with pytest.raises(PackingError, match="without its position_ids"):
            model(input_ids=batch["input_ids"], labels=batch["labels"])
        assert torch.isfinite(model(**batch).loss)
        dispatcher.expect_packed = False
        # a left-padded batch with position ids of its own (generate's recipe) is no packed batch
        ids, mask = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        assert torch.isfinite(loss)
    finally:
        dispatcher.expect_packed = False
        dispatcher.remove(handler)


def test_flash_attention_models_get_the_boundaries_of_a_packed_batch_from_the_dispatcher():
    """Flash attention reads packed rows from position ids only in a batch of one row; the dispatcher adds
    ``cu_seq_lens_*`` to a packed forward that lacks them (a user's collator, a (B, T) batch)."""
    model = tiny_model("llama", "sdpa")
    batch = PackedCollator(pad_token_id=0)([[sample(5, 1, 0), sample(4, 1, 1)], [sample(6, 2, 2)]])
    dispatcher = TokenLossDispatcher.for_model(model)
    model.config._attn_implementation_internal = "flash_attention_2"  # no forward runs: only the kwargs are read
    try:
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": True}
        segments = dispatcher._packing(kwargs)
        expected = flash_attention_kwargs(batch["position_ids"])
        assert kwargs["use_cache"] is False and torch.equal(segments, segment_ids(batch["position_ids"]))
        assert torch.equal(kwargs["cu_seq_lens_q"], expected["cu_seq_lens_q"]) and kwargs["max_length_q"] == 6
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
        assert torch.equal(kwargs["cu_seq_lens_k"], cu)
    finally:
        model.config._attn_implementation_internal = "sdpa"
        TokenLossDispatcher._registry.pop(model, None)
