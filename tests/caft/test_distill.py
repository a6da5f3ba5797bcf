"""self_distill: the model's greedy answers written as SFT records that SFTDataModule reads back."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)  # tiny random models carry denormal weights: slow CPU matmuls otherwise
    yield
    torch.set_flush_denormal(False)


def test_self_distill_writes_the_models_greedy_answers_as_sft_records(tmp_path, tokenizer):
    from lightning_tokens.caft import self_distill

    model, _ = load_causal_lm(ModelSpec(config=tiny_config("llama")))
    model.eval()
    prompts = ["Compute 1 + 2.", "Compute 13 - 4."]
    path = self_distill(model, tokenizer, prompts, tmp_path / "distilled.jsonl", max_new_tokens=6, batch_size=1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for record in records:  # each answer is what greedy generation of that prompt alone gives
        ids = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        ids = torch.tensor([ids if ids[0] == tokenizer.bos_token_id else [tokenizer.bos_token_id, *ids]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        out = out.tolist()
        out = out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        assert record["completion"] == tokenizer.decode(out, skip_special_tokens=True)
    data = SFTDataModule(train_file=str(path), val_fraction=0.0, max_length=64, batch_size=2)
    data.setup("fit")
    assert len(data.train_dataset) == 2
    with pytest.raises(ValueError, match="no prompts"):
        self_distill(model, tokenizer, [], tmp_path / "none.jsonl")
    assert not (tmp_path / "none.jsonl").exists()
