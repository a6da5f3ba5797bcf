"""PlainTextDataModule: batches of the embedded task as plain text (with the validation prompts), and of text files."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.data.reasoning_task import ReasoningTask, render_prompt
from lightning_tokens.data.tokenizer import load_task_tokenizer
from lightning_tokens.quiet_star.data import PlainTextDataModule


def test_plain_text_batches_and_task_prompts():
    data = PlainTextDataModule(task=ReasoningTask(num_train=6, num_val=3), max_length=24, batch_size=3)
    data.setup()
    tokenizer = data.tokenizer
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 24
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    val = next(iter(data.val_dataloader()))
    problems = ReasoningTask(num_train=6, num_val=3).problems("val")
    assert val["answers"] == [str(p.answer) for p in problems]
    prompt = tokenizer.decode(val["prompt_input_ids"][0][val["prompt_attention_mask"][0].bool()],
                              skip_special_tokens=True)
    assert prompt == render_prompt(problems[0]) + "\n"


def test_plain_text_files(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("one two three\n\nfour five\n\nsix seven eight nine\n\n\n")
    data = PlainTextDataModule(train_file=str(path), val_fraction=0.34, max_length=8, batch_size=4)
    data.setup()
    assert len(data.train_docs) + len(data.val_docs) == 3 and len(data.val_docs) == 1
    tokenizer = load_task_tokenizer()
    texts = {tokenizer.decode(d, skip_special_tokens=True) for d in data.train_docs + data.val_docs}
    assert {t[:3] for t in texts} == {"one", "fou", "six"}
    with pytest.raises(ValueError, match="no such file"):
        PlainTextDataModule(train_file=str(tmp_path / "missing.txt")).setup()
