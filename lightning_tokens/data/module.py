"""SFTDataModule: files, a hub dataset or the embedded reasoning task, tokenized for completion-only SFT."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, RandomSampler
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_tokens.checks import check_numbers
from lightning_tokens.data.encode import (
    Encoded,
    SFTCollator,
    Truncation,
    TruncationReport,
    apply_truncation,
    character_limit,
    encode_prompt,
    encode_record,
)
from lightning_tokens.data.packing import PackedCollator, PackedRows, PaddingFreeCollator, uses_flash_attention
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.records import (
    DataError,
    Record,
    check_prompt_record,
    from_dicts,
    read_file,
    read_hub_dataset,
)

# Checkpoints keep the task in the data module's hyperparameters; allow torch.load(weights_only=True) to read it.
torch.serialization.add_safe_globals([ReasoningTask])


class EncodedDataset(Dataset):
    """Encoded samples, each with its reference answer (or ``None``) for generation-based validation."""

    def __init__(self, samples: list[Encoded], answers: list[Optional[str]]) -> None:
        self.samples, self.answers = samples, answers

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Encoded, Optional[str]]:
        return self.samples[index], self.answers[index]


class EpochSeededSampler(RandomSampler):
    """A random order that depends only on ``seed`` and the epoch, so a resumed run sees the same order.

    Lightning calls ``set_epoch`` at every epoch start (and swaps in a ``DistributedSampler`` seeded the
    same way under DDP).
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class ResumableDataLoader(DataLoader):
    """A DataLoader that, restored from a checkpoint, continues the interrupted epoch where it stopped.

    Lightning stores the ``state_dict`` of a train DataLoader that has one in every checkpoint and hands it
    back on resume. ``progress`` tells how far the trainer got: ``(epoch, batches processed this epoch)``.
    On the first iteration after a restore the sampler is put back on that epoch (``set_epoch``) and the
    batches already trained on are skipped; skipping comes after the sampler, so it holds for any sampler
    (DDP's included).
    """

    def __init__(self, *args: Any, progress: Optional[Callable[[], tuple[int, int]]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume_at: Optional[tuple[int, int]] = None

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, done = state_dict["epoch"], state_dict["batches_done"]
        self._resume_at = (epoch + 1, 0) if done >= len(self) else (epoch, done)

    def __iter__(self) -> Iterator[Any]:
        # A generator: the restore below runs at the first batch, after Lightning has loaded the state.
        if self._resume_at is not None:
            epoch, done = self._resume_at
            self._resume_at = None
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            iterator = super().__iter__()
            for _ in range(done):
                next(iterator)
        else:
            iterator = super().__iter__()
        yield from iterator


def epoch_progress(trainer: Any) -> Optional[Callable[[], tuple[int, int]]]:
    """The ``progress`` of a :class:`ResumableDataLoader` trained on by ``trainer``: ``(epoch, batches done in
    it)``; ``None`` without a trainer."""
    if trainer is None:
        return None
    return lambda: (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed)


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data with completion-only labels.

    The data comes from, in order of precedence: ``train_file`` (``.jsonl``, ``.json`` or ``.parquet``),
    ``dataset`` (a 🤗 datasets name or local dataset directory), or the embedded reasoning ``task``
    (the default). Records are ``{"prompt", "completion"}`` or chat ``{"messages"}`` (see
    :mod:`lightning_tokens.data.encode` for the templates).

    Args:
        train_file: Training records file. Default ``None``.
        val_file: Validation records file. Default ``None``: a deterministic ``val_fraction`` of the
            training records (files and datasets) or the task's own validation split.
        dataset: Hub dataset name or local dataset directory. Default ``None``.
        dataset_config: Configuration name of ``dataset``. Default ``None``.
        train_split: Split of ``dataset`` to train on. Default ``"train"``.
        val_split: Split of ``dataset`` to validate on. Default ``None``: carved from ``train_split``.
        task: The embedded reasoning task, used when no file or dataset is given. Default
            ``ReasoningTask()``.
        tokenizer: Hub name or path of the tokenizer. Default ``None``: the LightningModule's
            ``tokenizer`` when it has one, else the embedded task tokenizer.
        max_length: Longest sample in tokens. Default ``512``.
        truncation: ``"truncate"`` (cut the end of an over-long sample) or ``"drop"`` (drop it); the
            counts are reported at setup. Default ``"truncate"``.
        val_fraction: Share of training records held out when there is no validation source. Default ``0.05``.
        seed: Seed of the split and of the shuffling. Default ``0``.
        batch_size: Training micro-batch size. Default ``8``.
        eval_batch_size: Validation batch size. Default ``None``: ``batch_size``.
        num_workers: DataLoader workers. Default ``0``.
        pad_to_multiple_of: Round padded lengths up to this multiple. Default ``1``.
        answer_field: Record field holding the reference final answer for generation-based validation.
            Default ``"answer"``; for the task, the answer of each problem. Records without it are
            scored on loss only.
        predict_file: Prompts for ``predict`` (``lightning-tokens predict``): records with a ``"prompt"``
            (a completion is not needed) and optionally the ``answer_field``. Default ``None``: the
            validation split's prompts.
        packing: Pack training samples into rows of at most ``max_length`` tokens, without padding between
            them (see :mod:`lightning_tokens.data.packing`): a batch is ``batch_size`` rows, each holding as
            many samples as fit, with ``position_ids`` restarting at every sample and no token attending
            across samples. Validation batches stay padded, so their losses compare with unpacked runs.
            Default ``False``.
        padding_free: Keep each training batch's ``batch_size`` samples (the same samples, in the same
            order, as padded batches) but pack them into rows of at most ``max_length`` tokens, the row width
            picked per batch so that it never takes more token slots than padding (see
            :class:`~lightning_tokens.data.packing.PaddingFreeCollator`): the same optimisation steps as padded
            batches, cheaper where lengths vary. Excludes ``packing``. Default ``False``.
        eval_by_length: Validation and test batches take the held-out samples shortest first (prompt and
            reference response together), so each batch's ``generate()`` call holds problems of similar size
            and stops sooner. Metrics are over the same samples; only the batching changes. With
            ``CausalLMModule(generation_batches=N)``, N > 0, the N generated batches would be the shortest
            samples, so that combination is refused. ``predict`` keeps the file's order. Default ``False``.
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        train_split: str = "train",
        val_split: Optional[str] = None,
        task: Optional[ReasoningTask] = None,
        tokenizer: Optional[str] = None,
        max_length: int = 512,
        truncation: Truncation = "truncate",
        val_fraction: float = 0.05,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pad_to_multiple_of: int = 1,
        answer_field: str = "answer",
        predict_file: Optional[str] = None,
        packing: bool = False,
        padding_free: bool = False,
        eval_by_length: bool = False,
    ) -> None:
        super().__init__()
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"SFTDataModule.truncation must be 'truncate' or 'drop', got {truncation!r}")
        if packing and padding_free:
            raise ValueError("SFTDataModule: packing and padding_free exclude each other; packing=True packs whole "
                             "rows of samples per batch, padding_free=True keeps batch_size samples per batch")
        check_numbers("SFTDataModule", max_length=(max_length, "an integer >= 2"),
                      val_fraction=(val_fraction, "in [0, 1)"), seed=(seed, "an integer"),
                      batch_size=(batch_size, "an integer >= 1"),
                      eval_batch_size=(eval_batch_size, "an integer >= 1 or None"),
                      num_workers=(num_workers, "an integer >= 0"),
                      pad_to_multiple_of=(pad_to_multiple_of, "an integer >= 1"))
        self.save_hyperparameters()
        self.train_file, self.val_file = train_file, val_file
        self.dataset, self.dataset_config = dataset, dataset_config
        self.train_split, self.val_split = train_split, val_split
        self.task = task if task is not None else ReasoningTask()
        self.tokenizer_name = tokenizer
        self.max_length, self.truncation = max_length, truncation
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pad_to_multiple_of = num_workers, pad_to_multiple_of
        self.answer_field, self.predict_file = answer_field, predict_file
        self.packing, self.padding_free = bool(packing), bool(padding_free)
        self.eval_by_length = bool(eval_by_length)
        self.packed_rows: Optional[PackedRows] = None
        self.predict_dataset: Optional[EncodedDataset] = None
        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.train_dataset: Optional[EncodedDataset] = None
        self.val_dataset: Optional[EncodedDataset] = None
        self.reports: dict[str, TruncationReport] = {}

    # -- sources ---------------------------------------------------------------------------------------
    def _records(self) -> tuple[list[Record], list[Record]]:
        if self.train_file is not None:
            train = read_file(self.train_file)
            if self.val_file is not None:
                return train, read_file(self.val_file)
            return self._split(train)
        if self.dataset is not None:
            train = read_hub_dataset(self.dataset, self.train_split, self.dataset_config)
            if self.val_split is not None:
                return train, read_hub_dataset(self.dataset, self.val_split, self.dataset_config)
            return self._split(train)
        return (from_dicts(self.task.records("train"), "reasoning task train"),
                from_dicts(self.task.records("val"), "reasoning task val"))

    def _split(self, records: list[Record]) -> tuple[list[Record], list[Record]]:
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        n_val = round(len(records) * self.val_fraction)
        if self.val_fraction > 0 and len(records) > 1:
            n_val = max(n_val, 1)
        held = set(order[:n_val])
        return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is not None:
            from lightning_tokens.modeling import ModelSpec, load_tokenizer

            return load_tokenizer(ModelSpec(tokenizer=self.tokenizer_name))
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if getattr(module, "tokenizer", None) is not None:
            return module.tokenizer
        from lightning_tokens.data.tokenizer import load_task_tokenizer

        return load_task_tokenizer()

    def _encode(self, records: list[Record], split: str) -> EncodedDataset:
        max_chars = character_limit(self.tokenizer, self.max_length)
        samples = [encode_record(self.tokenizer, record, max_chars) for record in records]
        answers = [self._answer(record) for record in records]
        by_origin = dict(zip((s.origin for s in samples), answers))
        kept, report = apply_truncation(samples, self.max_length, self.truncation)
        self.reports[split] = report
        if report.truncated or report.dropped:
            rank_zero_info(f"SFTDataModule {split}: {report} (max_length={self.max_length}, policy={self.truncation})")
        if not kept:
            raise DataError(f"SFTDataModule {split}: every sample is longer than max_length={self.max_length}")
        return EncodedDataset(kept, [by_origin[s.origin] for s in kept])

    def _answer(self, record: Record) -> Optional[str]:
        value = record.fields.get(self.answer_field)
        return None if value is None else str(value)

    # -- Lightning hooks -------------------------------------------------------------------------------
    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self._resolve_tokenizer()
            if self.tokenizer.pad_token_id is None:
                raise ValueError("SFTDataModule: the tokenizer has no pad token; set tokenizer.pad_token")
        if stage == "predict" and self.predict_file is not None:
            if self.predict_dataset is None:
                records = read_file(self.predict_file, check=check_prompt_record)
                samples = [encode_prompt(self.tokenizer, record) for record in records]
                self.predict_dataset = EncodedDataset(samples, [self._answer(record) for record in records])
            return
        if self.train_dataset is not None:
            return
        train, val = self._records()
        self.train_dataset = self._encode(train, "train")
        self.val_dataset = self._encode(val, "val") if val else None
        if self.packing:
            self.packed_rows = PackedRows(self.train_dataset, self.max_length)
            rank_zero_info(f"SFTDataModule train: {len(self.train_dataset)} samples packed into "
                           f"{len(self.packed_rows)} rows of at most {self.max_length} tokens "
                           f"({self.packed_rows.fill:.1%} filled)")

    def _collator(self, generation: bool) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of, generation=generation)

    @override
    def train_dataloader(self) -> DataLoader:
        dataset = self.packed_rows if self.packing else self.train_dataset
        collate: Callable = self._collator(False)
        if self.packing or self.padding_free:
            collate = PackedCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of,
                                     uses_flash_attention(self.trainer))
            if self.padding_free:
                collate = PaddingFreeCollator(collate, self.max_length)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, collate_fn=collate,
                                   sampler=EpochSeededSampler(dataset, self.seed), num_workers=self.num_workers,
                                   progress=epoch_progress(self.trainer))


    @override
    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        has_answers = any(a is not None for a in self.val_dataset.answers)
        samples = self.val_dataset.samples
        order = range(len(samples))
        if self.eval_by_length:
            order = sorted(order, key=lambda i: (len(samples[i].input_ids), i))
        return DataLoader(self.val_dataset, batch_size=self.eval_batch_size, sampler=list(order),
                          collate_fn=self._collator(has_answers), num_workers=self.num_workers)

    @override
    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompts (and reference answers) of ``predict_file``, or of the validation split."""
        dataset = self.predict_dataset if self.predict_file is not None else self.val_dataset
        if dataset is None:
            raise DataError("SFTDataModule: nothing to predict; set predict_file, or keep a validation split "
                            "(val_file, val_split or val_fraction > 0)")
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collator(True), num_workers=self.num_workers)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}


__all__ = ["SFTDataModule", "EpochSeededSampler", "EncodedDataset", "ResumableDataLoader", "epoch_progress"]
