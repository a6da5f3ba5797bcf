"""PredictionWriter: what ``predict_step`` returns, written as JSON lines (``lightning-tokens predict``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, TextIO

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class PredictionWriter(BasePredictionWriter):
    """Writes every row ``predict_step`` returns (a list of dicts per batch) as one JSON line, as it comes.

    ``CausalLMModule.predict_step`` gives ``prompt``, ``completion``, ``answer`` and, with a reference answer,
    ``reference`` and ``correct``.

    Args:
        path: The JSONL file (its folder is created). Default ``"runs/predictions.jsonl"``. With several
            processes, rank ``r`` writes ``<stem>.rank<r><suffix>``.
    """

    def __init__(self, path: str = "runs/predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self.written: Optional[Path] = None
        self.rows = 0
        self._handle: Optional[TextIO] = None

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle, self.written, self.rows = path.open("w", encoding="utf-8"), path, 0

    @override
    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        for row in prediction:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.rows += 1
        self._handle.flush()

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            rank_zero_info(f"PredictionWriter: {self.rows} predictions written to {self.written}")
