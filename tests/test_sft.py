"""CausalLMModule (lightning_tokens/sft.py): generation-based validation, export, logging, checkpoints."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig, SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from tests.tiny import tiny_config


def test_batched_left_padded_generation_equals_each_row_alone(tokenizer):
    module = CausalLMModule(model=ModelSpec(config=tiny_config(initializer_range=0.3)), max_new_tokens=12)
    prompts = ["Compute 1 + 2.", "Compute 345 - 67 + 8."]
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batched = module.generate(ids, mask)
    for row, completion in zip(rows, batched):
        alone = module.generate(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
        assert completion == alone


def test_generation_validation_scores_exact_match_and_thinking_length(tokenizer, monkeypatch):
    task = ReasoningTask(num_train=8, num_val=6)
    data = SFTDataModule(task=task, batch_size=3)
    module = CausalLMModule(model=ModelSpec(config=tiny_config()))
    records = task.records("val")
    # A stand-in generator that answers rows 0, 2 and 4 correctly and the others wrongly.
    scripted = []
    for i, record in enumerate(records):
        text = record["completion"] if i % 2 == 0 else "<think>\n1+1=2\n</think>\nThe answer is 99999."
        scripted.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    calls = iter(range(0, 6, 3))
    monkeypatch.setattr(module, "generate", lambda ids, mask: scripted[next(calls):][: ids.shape[0]])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert metrics["val/exact_match"] == pytest.approx(0.5)
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    lengths = [ids.index(end) - ids.index(think) - 1 for ids in scripted]
    assert metrics["val/thinking_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert math.isfinite(metrics["val/loss"])
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)


def test_export_merged_lora_loads_as_a_plain_model_with_the_same_logits(tmp_path, tokenizer):
    module = CausalLMModule(model=ModelSpec(config=tiny_config(), lora={"r": 4, "lora_alpha": 8}))
    for name, parameter in module.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # make the adapters matter
    ids = tokenizer(["Compute 5 + 6."], return_tensors="pt")["input_ids"]
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
    module.export(tmp_path / "merged", merge_lora=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert "lora" not in "".join(plain.state_dict())
    module.export(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_config.json").exists()
    assert (tmp_path / "adapters" / "tokenizer.json").exists()


def test_merge_into_quantized_weights_is_refused(tmp_path):
    module = CausalLMModule(model=ModelSpec(config=tiny_config(), quantization="nf4", compute_dtype="float32",
                                            lora={"r": 2}))
    with pytest.raises(ValueError, match="quantized"):
        module.export(tmp_path, merge_lora=True)


def test_training_logs_loss_ppl_and_throughput():
    module = CausalLMModule(model=ModelSpec(config=tiny_config()))
    data = SFTDataModule(task=ReasoningTask(num_train=16, num_val=4), batch_size=8)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    assert logged["train/ppl"] == pytest.approx(math.exp(logged["train/loss"]), rel=1e-4)
    assert logged["train/tokens_per_sec"] > 0


def test_checkpoint_loads_back_with_safe_weights_only_loading(tmp_path):
    module = CausalLMModule(model=ModelSpec(config=tiny_config()), optimizer=OptimizerConfig(lr=1e-3, betas=(0.8, 0.9)))
    data = SFTDataModule(task=ReasoningTask(num_train=8, num_val=2), batch_size=4)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = CausalLMModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.optim == module.optim and loaded.spec == module.spec
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
