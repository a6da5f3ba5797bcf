"""Plain-text batches for continued pretraining (Quiet-STaR trains on raw text, every token a target)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_tokens.checks import check_numbers
from lightning_tokens.data.encode import Encoded, pad
from lightning_tokens.data.module import EpochSeededSampler, ResumableDataLoader, epoch_progress
from lightning_tokens.data.packing import PackedCollator, PackedRows
from lightning_tokens.data.reasoning_task import ReasoningTask, render_prompt
from lightning_tokens.lean_loss import IGNORE_INDEX


class PlainTextDataModule(LightningDataModule):
    """Documents of plain text, each cropped to ``max_length`` tokens (the paper: 256-token crops).

    The text comes from, in order of precedence: ``train_file`` (``.txt`` with documents separated by a blank
    line, or ``.jsonl`` with a ``text_field``), ``dataset`` (a 🤗 datasets name, its ``text_field``), or the
    embedded reasoning ``task``'s corpus (the default). Batches carry ``input_ids``, ``attention_mask`` and
    ``labels`` (the ids, ``-100`` on padding). For the task, validation batches also carry the problems'
    prompts (left-padded ``prompt_input_ids``/``prompt_attention_mask``) and ``answers``, for
    generation-based accuracy.

    Args:
        train_file: A ``.txt`` or ``.jsonl`` file of documents. Default ``None``.
        dataset: Hub dataset name or local dataset directory. Default ``None``.
        dataset_config: Its configuration name. Default ``None``.
        split: Its split. Default ``"train"``.
        text_field: Field holding the text in ``.jsonl`` records and dataset rows. Default ``"text"``.
        max_documents: Read at most this many documents (hub corpora are large). Default ``None``: all.
        task: The embedded reasoning task. Default ``ReasoningTask()``.
        tokenizer: Hub name or path of the tokenizer. Default ``None``: the LightningModule's.
        max_length: Tokens per document crop. Default ``256``.
        val_fraction: Share of documents held out for validation (files and datasets). Default ``0.02``.
        batch_size: Training batch size. Default ``8``.
        eval_batch_size: Validation batch size. Default ``None``: ``batch_size``.
        seed: Seed of the shuffling and the split. Default ``0``.
        packing: Pack training crops into rows of at most ``max_length`` tokens without padding (see
            :mod:`lightning_tokens.data.packing`); thoughts never read another crop. Validation stays
            padded. Default ``False``.
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        split: str = "train",
        text_field: str = "text",
        max_documents: Optional[int] = None,
        task: Optional[ReasoningTask] = None,
        tokenizer: Optional[str] = None,
        max_length: int = 256,
        val_fraction: float = 0.02,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        seed: int = 0,
        packing: bool = False,
    ) -> None:
        super().__init__()
        check_numbers("PlainTextDataModule", max_documents=(max_documents, "an integer >= 1 or None"),
                      max_length=(max_length, "an integer >= 2"), val_fraction=(val_fraction, "in [0, 1)"),
                      batch_size=(batch_size, "an integer >= 1"),
                      eval_batch_size=(eval_batch_size, "an integer >= 1 or None"), seed=(seed, "an integer"))
        self.save_hyperparameters()
        self.train_file, self.dataset, self.dataset_config, self.split = train_file, dataset, dataset_config, split
        self.text_field, self.max_documents = text_field, max_documents
        self.task = task if task is not None else ReasoningTask()
        self.tokenizer_name, self.max_length, self.val_fraction = tokenizer, max_length, val_fraction
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size or batch_size, seed
        self.packing = bool(packing)
        self.tokenizer = None
        self.train_docs: list[list[int]] = []
        self.val_docs: list[list[int]] = []
        self.val_prompts: list[tuple[list[int], str]] = []

    def _texts(self) -> tuple[list[str], list[str]]:
        if self.train_file is None and self.dataset is None:
            return self.task.corpus("train").split("\n\n"), self.task.corpus("val").split("\n\n")
        texts = self._file_texts() if self.train_file is not None else self._dataset_texts()
        texts = [t for t in texts if t.strip()][: self.max_documents]
        if not texts:
            raise ValueError(f"PlainTextDataModule: {self.train_file or self.dataset} holds no text")
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, round(self.val_fraction * len(texts))) if self.val_fraction > 0 and len(texts) > 1 else 0
        return [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]

    def _file_texts(self) -> list[str]:
        path = Path(self.train_file)
        if not path.exists():
            raise ValueError(f"PlainTextDataModule.train_file: {path}: no such file")
        if path.suffix == ".txt":
            return path.read_text(encoding="utf-8").split("\n\n")
        if path.suffix != ".jsonl":
            raise ValueError(f"PlainTextDataModule.train_file: {path}: use a .txt or .jsonl file")
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                record = json.loads(line)
                if self.text_field not in record:
                    raise ValueError(f"{path}:{number}: missing field {self.text_field!r}")
                texts.append(record[self.text_field])
        return texts

    def _dataset_texts(self) -> list[str]:
        import datasets

        split = self.split if self.max_documents is None else f"{self.split}[:{self.max_documents}]"
        rows = datasets.load_dataset(self.dataset, self.dataset_config, split=split)
        if self.text_field not in rows.column_names:
            raise ValueError(f"PlainTextDataModule.text_field: {self.dataset} has no column {self.text_field!r} "
                             f"(columns: {', '.join(rows.column_names)})")
        return list(rows[self.text_field])

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return (bos + ids)[: self.max_length]

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_docs:
            return
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if self.tokenizer_name is not None:
            from lightning_tokens.modeling import ModelSpec, load_tokenizer

            self.tokenizer = load_tokenizer(ModelSpec(tokenizer=self.tokenizer_name))
        elif getattr(module, "tokenizer", None) is not None:
            self.tokenizer = module.tokenizer
        else:
            from lightning_tokens.data.tokenizer import load_task_tokenizer

            self.tokenizer = load_task_tokenizer()
        train, val = self._texts()
        self.train_docs = [d for d in map(self._encode, train) if len(d) >= 2]
        self.val_docs = [d for d in map(self._encode, val) if len(d) >= 2]
        if self.train_file is None and self.dataset is None:
            self.val_prompts = [(self._encode(render_prompt(p) + "\n"), str(p.answer))
                                for p in self.task.problems("val")]

    def _collate(self, docs: list[list[int]]) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_token_id or 0
        ids = pad(docs, pad_id)
        mask = pad([[1] * len(d) for d in docs], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}

    def _collate_val(self, items: list[tuple[list[int], Optional[tuple[list[int], str]]]]) -> dict[str, Any]:
        batch = self._collate([doc for doc, _ in items])
        prompts = [prompt for _, prompt in items]
        if all(p is not None for p in prompts):
            ids = [p[0] for p in prompts]
            batch["prompt_input_ids"] = pad(ids, self.tokenizer.pad_token_id or 0, side="left")
            batch["prompt_attention_mask"] = pad([[1] * len(i) for i in ids], 0, side="left")
            batch["answers"] = [p[1] for p in prompts]
        return batch

    @override
    def train_dataloader(self) -> DataLoader:
        dataset, collate = self.train_docs, self._collate
        if self.packing:
            crops = [Encoded(doc, doc, 0, f"document {i}") for i, doc in enumerate(self.train_docs)]
            dataset = PackedRows(crops, self.max_length)
            collate = PackedCollator(self.tokenizer.pad_token_id or 0)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, collate_fn=collate,
                                   sampler=EpochSeededSampler(dataset, self.seed),
                                   progress=epoch_progress(self.trainer))

    @override
    def val_dataloader(self) -> DataLoader | list:
        if not self.val_docs:
            return []
        prompts = self.val_prompts if len(self.val_prompts) == len(self.val_docs) else [None] * len(self.val_docs)
        return DataLoader(list(zip(self.val_docs, prompts)), batch_size=self.eval_batch_size,
                          collate_fn=self._collate_val)
