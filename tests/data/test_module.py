"""SFTDataModule and its sampler (lightning_tokens/data/module.py): sources, splits, epoch-seeded order, drop reports,
argument checks, and over-long records cut before tokenizing."""

from __future__ import annotations

import pytest

from lightning_tokens.data.encode import encode_record
from lightning_tokens.data.module import EpochSeededSampler, SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.records import DataError, Record
from tests.data.builders import ROWS, write_jsonl


def test_hub_style_dataset_from_a_local_directory(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS * 4)
    data = SFTDataModule(dataset=str(folder), val_fraction=0.25, batch_size=2)
    data.setup()
    assert len(data.train_dataset) == 9 and len(data.val_dataset) == 3


def test_datamodule_reports_drops_and_rejects_all_too_long(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    data = SFTDataModule(train_file=str(path), max_length=8, truncation="drop", val_fraction=0.0)
    with pytest.raises(DataError, match="longer than max_length=8"):
        data.setup()


def test_deterministic_split_and_epoch_seeded_order(tmp_path):
    rows = [dict(r, prompt=r["prompt"] + f" #{i}") for i, r in enumerate(ROWS * 10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first, second = (SFTDataModule(train_file=str(path), val_fraction=0.2, seed=3) for _ in range(2))
    first.setup(), second.setup()
    assert [s.origin for s in first.val_dataset.samples] == [s.origin for s in second.val_dataset.samples]
    assert len(first.val_dataset) == 6
    sampler = EpochSeededSampler(first.train_dataset, seed=5)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != epoch1
    sampler.set_epoch(1)
    assert list(sampler) == epoch1


def test_task_is_the_default_source_and_carries_answers():
    data = SFTDataModule(task=ReasoningTask(num_train=40, num_val=8), batch_size=4)
    data.setup()
    assert len(data.train_dataset) == 40 and len(data.val_dataset) == 8
    batch = next(iter(data.val_dataloader()))
    assert "prompt_input_ids" in batch and all(a is not None for a in batch["answers"])


def test_invalid_datamodule_arguments_name_the_field():
    with pytest.raises(ValueError, match="SFTDataModule.val_fraction"):
        SFTDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="SFTDataModule.truncation"):
        SFTDataModule(truncation="cut")


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_an_over_long_record_is_cut_before_tokenizing_with_the_same_result(tmp_path, tokenizer, policy, monkeypatch):
    long_completion = "<think>\n" + "12+34=46\n" * 200_000 + "</think>\nThe answer is 46."  # 1.8 MB
    rows = [ROWS[0], {"prompt": "Compute 12 + 34.", "completion": long_completion}, ROWS[1]]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    seen = []
    original = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    data = SFTDataModule(train_file=str(path), max_length=64, truncation=policy, val_fraction=0.0)
    data.tokenizer = tokenizer
    data.setup()
    assert max(seen) <= (64 + 8) * max(len(t) for t in tokenizer.get_vocab())  # never the whole 1.8 MB
    report = data.reports["train"]
    assert (report.truncated, report.dropped) == ((1, 0) if policy == "truncate" else (0, 1))
    if policy == "truncate":
        monkeypatch.setattr(type(tokenizer), "__call__", original)
        full = encode_record(tokenizer, Record(rows[1], "full"))
        kept = [s for s in data.train_dataset.samples if len(s.input_ids) == 64]
        assert len(kept) == 1 and kept[0].input_ids == full.input_ids[:64] and kept[0].labels == full.labels[:64]
