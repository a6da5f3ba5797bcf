"""Reasoning traces to predictor training samples: remaining-length targets from the thinking span.

For a trace whose thinking span runs from ``<think>`` at index ``s`` to ``</think>`` at index ``e``, the
hidden state at position ``i`` (``s <= i < e``) sees candidate token ``i + 1`` and its target is the
number of thinking tokens left counting that candidate, ``L_i = e - i`` (``L = 1`` when the candidate is
``</think>``). Targets are computed on the whole trace before truncation, so a trace cut at
``max_length`` keeps true targets. A trace with no ``</think>`` after its prompt is skipped and counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_tokens.checks import check_numbers
from lightning_tokens.data.encode import encode_record, pad
from lightning_tokens.data.module import EpochSeededSampler, ResumableDataLoader, epoch_progress
from lightning_tokens.data.packing import PackedCollator, PackedRows, uses_flash_attention
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.records import DataError, Record, check_record, from_dicts, read_file
from lightning_tokens.files import atomic_path
from lightning_tokens.reasoning import THINK_END, THINK_START


def think_token_id(tokenizer: PreTrainedTokenizerBase, token: str, field_name: str) -> int:
    """The id of a marker that must be one token (``<think>``, ``</think>``); a clear error otherwise."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{field_name}: {token!r} is not a single token of this tokenizer (it encodes to {ids})")
    return ids[0]


def remaining_lengths(input_ids: list[int], prompt_length: int, start_id: Optional[int],
                      end_id: int) -> Optional[list[int]]:
    """Per-position targets ``L_i`` (0 outside the thinking span), or ``None`` when there is no ``</think>``.

    Args:
        input_ids: The whole trace (prompt and completion).
        prompt_length: Tokens of the prompt; the span's ``</think>`` is the first one after them.
        start_id: Id of ``<think>``; the span starts at the last one before ``</think>``, or at the last
            prompt token when there is none (or ``start_id`` is ``None``).
        end_id: Id of ``</think>``.
    """
    try:
        end = input_ids.index(end_id, prompt_length)
    except ValueError:
        return None
    start = prompt_length - 1
    if start_id is not None:
        before = [i for i in range(end) if input_ids[i] == start_id]
        if before:
            start = before[-1]
    return [end - i if start <= i < end else 0 for i in range(len(input_ids))]


@dataclass
class TraceReport:
    """What encoding did to a split's traces."""

    kept: int = 0
    truncated: int = 0
    no_think_end: int = 0
    too_long: int = 0

    def __str__(self) -> str:
        return (f"{self.kept} kept ({self.truncated} truncated), {self.no_think_end} skipped without </think>, "
                f"{self.too_long} skipped with the prompt alone over max_length")


@dataclass
class TraceSample:
    input_ids: list[int]
    remaining: list[int]
    origin: str = field(default="")


def encode_traces(records: list[Record], tokenizer: PreTrainedTokenizerBase, max_length: int,
                  think_start: Optional[str] = THINK_START,
                  think_end: str = THINK_END) -> tuple[list[TraceSample], TraceReport]:
    """Encode prompt/completion (or messages) records into samples with remaining-length targets.

    Args:
        records: Traces.
        tokenizer: The LM's tokenizer.
        max_length: Longest sample; longer traces are cut (targets stay those of the whole trace).
        think_start: Marker opening the thinking span, or ``None``. Default ``"<think>"``.
        think_end: Marker closing it. Default ``"</think>"``.
    """
    start_id = think_token_id(tokenizer, think_start, "think_start") if think_start else None
    end_id = think_token_id(tokenizer, think_end, "think_end")
    report, samples = TraceReport(), []
    for record in records:
        encoded = encode_record(tokenizer, record)
        targets = remaining_lengths(encoded.input_ids, encoded.prompt_length, start_id, end_id)
        if targets is None:
            report.no_think_end += 1
            continue
        ids = encoded.input_ids
        if len(ids) > max_length:
            if not any(targets[:max_length]):
                report.too_long += 1
                continue
            ids, targets = ids[:max_length], targets[:max_length]
            report.truncated += 1
        samples.append(TraceSample(ids, targets, record.origin))
    report.kept = len(samples)
    return samples, report


def _check_trace(record: Record) -> Record:
    fields = record.fields
    empty = isinstance(fields, dict) and isinstance(fields.get("prompt"), str) and fields.get("completion") == ""
    return record if empty else check_record(record)


def read_traces(path: str | Path) -> list[Record]:
    """Trace records of a ``.jsonl``/``.json``/``.parquet`` file. Unlike SFT files, an empty completion (a model
    that stopped at once) is accepted: it has no ``</think>``, so :func:`encode_traces` skips and counts it."""
    return read_file(path, check=_check_trace)


def collate_traces(samples: list[TraceSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``remaining`` (0 = not supervised)."""
    input_ids = pad([s.input_ids for s in samples], pad_token_id)
    attention_mask = pad([[1] * len(s.input_ids) for s in samples], 0)
    remaining = pad([s.remaining for s in samples], 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "remaining": remaining}


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (through a temporary file, so nothing half-written is left)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


class TraceDataModule(LightningDataModule):
    """Traces for :class:`BudgetPredictorModule`: a JSONL/JSON/parquet file (e.g. from :func:`collect_traces`)
    or the embedded reasoning task's dataset traces.

    Batches carry ``input_ids``, ``attention_mask`` (right padding) and ``remaining`` (``L_i``, 0 where a
    position is not supervised); packed training batches (``packing=True``) carry ``position_ids`` in place
    of ``attention_mask``.

    Args:
        train_file: Trace records (``prompt``/``completion`` or ``messages``). Default ``None``: the task.
        val_file: Validation traces. Default ``None``: ``val_fraction`` of ``train_file``, or the task's
            validation split.
        task: Embedded task used without files. Default ``ReasoningTask(style="mixed")``.
        think_start: Marker opening thinking (a single token), or ``None`` to start at the response.
            Default ``"<think>"``.
        think_end: Marker closing thinking (a single token). Default ``"</think>"``.
        max_length: Longest sample; targets of cut traces stay those of the whole trace. Default ``1024``
            (the reference truncates at 8192).
        val_fraction: Share of ``train_file`` held out when there is no ``val_file``. Default ``0.05``.
        batch_size: Training batch size. Default ``8``.
        eval_batch_size: Validation batch size. Default ``None``: ``batch_size``.
        seed: Seed of the split and shuffling. Default ``0``.
        num_workers: DataLoader workers. Default ``0``.
        packing: Pack training traces into rows of at most ``max_length`` tokens without padding (see
            :mod:`lightning_tokens.data.packing`). Validation stays padded. Default ``False``.
    """

    def __init__(self, train_file: Optional[str] = None, val_file: Optional[str] = None,
                 task: Optional[ReasoningTask] = None, think_start: Optional[str] = THINK_START,
                 think_end: str = THINK_END, max_length: int = 1024, val_fraction: float = 0.05,
                 batch_size: int = 8, eval_batch_size: Optional[int] = None, seed: int = 0, num_workers: int = 0,
                 packing: bool = False) -> None:
        super().__init__()
        check_numbers("TraceDataModule", max_length=(max_length, "an integer >= 2"),
                      val_fraction=(val_fraction, "in [0, 1)"), batch_size=(batch_size, "an integer >= 1"),
                      eval_batch_size=(eval_batch_size, "an integer >= 1 or None"), seed=(seed, "an integer"),
                      num_workers=(num_workers, "an integer >= 0"))
        self.save_hyperparameters()
        self.train_file, self.val_file = train_file, val_file
        self.task = task if task is not None else ReasoningTask(style="mixed")
        self.think_start, self.think_end = think_start, think_end
        self.max_length, self.val_fraction, self.seed = max_length, val_fraction, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.packing = num_workers, bool(packing)
        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.train_samples: list[TraceSample] = []
        self.val_samples: list[TraceSample] = []
        self.reports: dict[str, TraceReport] = {}

    def _records(self) -> tuple[list[Record], list[Record]]:
        if self.train_file is None:
            return (from_dicts(self.task.records("train"), "reasoning task train"),
                    from_dicts(self.task.records("val"), "reasoning task val"))
        train = read_traces(self.train_file)
        if self.val_file is not None:
            return train, read_traces(self.val_file)
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        held = set(order[: max(1, round(len(train) * self.val_fraction)) if self.val_fraction > 0 else 0])
        return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_samples:
            return
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if self.tokenizer is None:
            if getattr(module, "tokenizer", None) is None:
                from lightning_tokens.data.tokenizer import load_task_tokenizer

                self.tokenizer = load_task_tokenizer()
            else:
                self.tokenizer = module.tokenizer
        train, val = self._records()
        for split, records in (("train", train), ("val", val)):
            samples, report = encode_traces(records, self.tokenizer, self.max_length, self.think_start, self.think_end)
            self.reports[split] = report
            rank_zero_info(f"TraceDataModule {split}: {report}")
            setattr(self, f"{split}_samples", samples)
        if not self.train_samples:
            raise DataError(f"TraceDataModule: no usable training trace ({self.reports['train']})")

    def _loader(self, samples: list[TraceSample], train: bool) -> DataLoader:
        collate = partial(collate_traces, pad_token_id=self.tokenizer.pad_token_id)
        if train:
            dataset = PackedRows(samples, self.max_length) if self.packing else samples
            if self.packing:
                collate = PackedCollator(self.tokenizer.pad_token_id,
                                         flash_attention=uses_flash_attention(self.trainer), fields=("remaining",))
            return ResumableDataLoader(dataset, batch_size=self.batch_size,
                                       sampler=EpochSeededSampler(dataset, self.seed), collate_fn=collate,
                                       num_workers=self.num_workers, progress=epoch_progress(self.trainer))
        return DataLoader(samples, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_samples, False) if self.val_samples else []
