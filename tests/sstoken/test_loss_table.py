"""The history-loss file (sstoken/loss_table.py): a saved table gives each sample its losses in padded and packed rows;
a file made for other data, a foreign file or no file is refused with one error."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.sft import CausalLMModule
from lightning_tokens.sstoken import TokenSelection, score_main
from lightning_tokens.sstoken.loss_table import LossTable, sample_key
from tests.sstoken.helpers import SMALL_TASK, write_config
from tests.tiny import tiny_config, trainer


def test_precomputed_file_for_other_data_is_refused(tmp_path):
    output = tmp_path / "history.pt"
    score_main(["--config", str(write_config(tmp_path, seed=1)), "--output", str(output), "--device", "cpu"])
    module = CausalLMModule(model=ModelSpec(config=tiny_config("llama")), max_new_tokens=2)
    selection = TokenSelection(history="precomputed", history_file=str(output))
    with pytest.raises(ValueError, match="does not match the training data: \\d+ of 24 samples missing"):
        trainer(max_steps=1, callbacks=[selection]).fit(
            module, datamodule=SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=128))
    with pytest.raises(FileNotFoundError, match="history_file"):
        TokenSelection(history="precomputed", history_file=str(tmp_path / "none.pt")).attach(module.model)


SAMPLES = [([5, 6, 7, 8], [-100, -100, 7, 8], [0.1, 0.2]), ([9, 10, 11], [-100, 10, 11], [0.3, 0.4])]


def expected_lookup(rows):
    """``(B, T - 1)``: each sample's losses at the positions predicting its target tokens, 0 elsewhere."""
    width = max(sum(len(SAMPLES[s][0]) for s in row) for row in rows)
    out = torch.zeros(len(rows), width - 1)
    for b, row in enumerate(rows):
        offset = 0
        for s in row:
            ids, labels, losses = SAMPLES[s]
            targets = [i for i in range(1, len(ids)) if labels[i] != -100]
            for i, loss in zip(targets, losses):
                out[b, offset + i - 1] = loss
            offset += len(ids)
    return out


def batch_of(rows):
    """Right-padded rows, each the concatenation of the samples it lists, and each token's sample number."""
    width = max(sum(len(SAMPLES[s][0]) for s in row) for row in rows)
    ids, labels = torch.zeros(len(rows), width, dtype=torch.long), torch.full((len(rows), width), -100)
    mask, segments = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, row in enumerate(rows):
        offset = 0
        for number, s in enumerate(row):
            n = len(SAMPLES[s][0])
            place = slice(offset, offset + n)
            ids[b, place], labels[b, place] = torch.tensor(SAMPLES[s][0]), torch.tensor(SAMPLES[s][1])
            mask[b, place], segments[b, place] = 1, number
            offset += n
    return ids, mask, labels, segments


def test_a_saved_table_looks_up_each_samples_losses_in_padded_and_packed_rows(tmp_path):
    keys = [sample_key(ids, labels) for ids, labels, _ in SAMPLES]
    LossTable(keys, [torch.tensor(losses) for *_, losses in SAMPLES]).save(tmp_path / "h.pt")
    table = LossTable.load(tmp_path / "h.pt")
    pairs = [(ids, labels) for ids, labels, _ in SAMPLES]
    table.check(pairs)
    for rows, packed in (([[1], [0]], False), ([[0, 1]], True)):
        ids, mask, labels, segments = batch_of(rows)
        got = table.lookup(ids, mask, labels, segments if packed else None)
        torch.testing.assert_close(got, expected_lookup(rows))
    with pytest.raises(ValueError, match="history_file: .* 1 of 2 samples missing"):
        LossTable(keys[:1], [torch.tensor(SAMPLES[0][2])]).check(pairs)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="history_file: .* is not a history-loss file"):
        LossTable.load(tmp_path / "other.pt")
