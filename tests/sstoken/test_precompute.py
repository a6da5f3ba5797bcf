"""Scoring a training set with the history model (sstoken/precompute.py, run by ``lightning-tokens score``): the stored
losses are the model's own per-token losses, and TokenSelection trains on them."""

from __future__ import annotations

import math

import pytest

from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.sft import CausalLMModule
from lightning_tokens.sstoken import LossTable, TokenSelection, score_main
from tests.sstoken.helpers import SMALL_TASK, write_config
from tests.sstoken.naive import naive_token_losses
from tests.tiny import tiny_config, trainer


def test_score_command_then_precomputed_history(tmp_path):
    config = write_config(tmp_path, seed=0)
    output = tmp_path / "history.pt"
    score_main(["--config", str(config), "--output", str(output), "--device", "cpu", "--batch_size", "5"])
    table = LossTable.load(output)
    assert len(table.index) == SMALL_TASK["num_train"]

    module = CausalLMModule(model=ModelSpec(config=tiny_config("llama")), max_new_tokens=2)
    data = SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=128)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    # the stored losses are the initial model's per-token losses of exactly these samples
    expected = naive_token_losses(module.model, batch)
    looked_up = table.lookup(batch["input_ids"], batch["attention_mask"], batch["labels"])
    for b, row in enumerate(expected):
        for i, value in row.items():
            assert looked_up[b, i - 1].item() == pytest.approx(value, rel=1e-5, abs=1e-6)

    selection = TokenSelection(history="precomputed", history_file=str(output), warmup=0)
    fit = trainer(max_steps=2, callbacks=[selection])
    fit.fit(module, datamodule=SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=128))
    assert math.isfinite(fit.callback_metrics["selection/rel"])
