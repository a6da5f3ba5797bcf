"""PredictionWriter: what ``predict_step`` returns, written as JSON lines (lightning_tokens/predict.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_tokens import PredictionWriter


class Rows(pl.LightningModule):
    """Returns, for each batch of numbers, one dict per number."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        return [{"n": int(n), "square": int(n) ** 2, "text": f"é{int(n)}"} for n in batch]


def predict(writer, numbers, batch_size=2):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])
    trainer.predict(Rows(), DataLoader(torch.tensor(numbers), batch_size=batch_size), return_predictions=False)


def test_every_row_is_one_json_line_in_order(tmp_path):
    path = tmp_path / "out" / "predictions.jsonl"
    writer = PredictionWriter(str(path))
    predict(writer, [1, 2, 3, 4, 5])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"n": n, "square": n * n, "text": f"é{n}"} for n in range(1, 6)]
    assert "é" in lines[0] and writer.rows == 5 and writer.written == path


def test_a_second_run_replaces_the_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    predict(PredictionWriter(str(path)), [1, 2, 3])
    predict(PredictionWriter(str(path)), [7])
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [7]


def test_each_process_writes_its_own_file(tmp_path):
    writer = PredictionWriter(str(tmp_path / "predictions.jsonl"))
    writer.on_predict_start(SimpleNamespace(world_size=2, global_rank=1), None)
    writer.on_predict_end(None, None)
    assert writer.written == tmp_path / "predictions.rank1.jsonl" and writer.written.exists()
