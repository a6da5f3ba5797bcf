"""Budget predictor training (budget/module.py): loss against a naive computation, frozen LM, checkpoints, nf4,
configs.

DDP runs are in test_module_ddp.py.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens.budget import BudgetPredictor, BudgetPredictorModule, TraceDataModule
from lightning_tokens.budget.data import collate_traces, encode_traces
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.records import from_dicts
from lightning_tokens.modeling import ModelSpec, is_quantized
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
TASK = dict(num_train=24, num_val=8, style="mixed")


def small_data(**kwargs):
    return TraceDataModule(task=ReasoningTask(**TASK), max_length=kwargs.pop("max_length", 64), batch_size=4, **kwargs)


def trainer(tmp_path, steps=3, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=1, val_check_interval=steps,
                      enable_progress_bar=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path,
                      **kwargs)


def test_loss_equals_a_naive_gamma_nll(tokenizer):
    module = BudgetPredictorModule(ModelSpec(config=tiny_config("qwen2")))
    records = from_dicts(ReasoningTask(**TASK).records("train")[:3], "task")
    samples, _ = encode_traces(records, tokenizer, max_length=40)  # some traces are cut: targets must stay right
    batch = collate_traces(samples, tokenizer.pad_token_id)
    nll = module.step(batch)[0]
    # Naive: output_hidden_states, a loop over rows and positions, torch.distributions for the density.
    out = module.model(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    states = torch.stack(out.hidden_states, dim=2)
    picked, next_tokens, lengths = [], [], []
    for row in range(3):
        for i in range(batch["input_ids"].shape[1] - 1):
            length = int(batch["remaining"][row, i])
            if length > 0 and batch["attention_mask"][row, i]:
                picked.append(states[row, i])
                next_tokens.append(int(batch["input_ids"][row, i + 1]))
                lengths.append(length)
    alpha, rate = module.predictor(torch.stack(picked), torch.tensor(next_tokens))
    y = torch.log(torch.tensor(lengths, dtype=torch.float32) + 1)
    expected = -torch.distributions.Gamma(alpha, rate).log_prob(y)
    torch.testing.assert_close(nll, expected, rtol=1e-4, atol=1e-5)


def test_training_keeps_the_lm_frozen_and_checkpoints_hold_the_predictor(tmp_path):
    module = BudgetPredictorModule(ModelSpec(config=tiny_config("llama")), predictor_path=str(tmp_path / "p.pt"))
    lm_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    predictor_before = {k: v.clone() for k, v in module.predictor.state_dict().items()}
    modes = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.model.training, pl_module.predictor.training))

    run = trainer(tmp_path, callbacks=[Spy()], enable_checkpointing=True)
    run.fit(module, small_data())
    assert modes and all(m == (False, True) for m in modes)
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in lm_before.items())
    assert not all(torch.equal(v, module.predictor.state_dict()[k]) for k, v in predictor_before.items())
    assert all(p.grad is None for p in module.model.parameters())
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    keys = torch.load(checkpoint, weights_only=True)["state_dict"].keys()
    assert keys and all(k.startswith("predictor.") for k in keys)
    restored = BudgetPredictorModule.load_from_checkpoint(checkpoint, weights_only=True)
    saved = BudgetPredictor.load(tmp_path / "p.pt")
    for name, value in module.predictor.state_dict().items():
        assert torch.equal(restored.predictor.state_dict()[name], value)
        assert torch.equal(saved.state_dict()[name], value)


def test_training_with_an_nf4_frozen_lm(tmp_path):
    module = BudgetPredictorModule(ModelSpec(config=tiny_config("llama"), quantization="nf4"))
    assert is_quantized(module.model)
    before = module.predictor.alpha_head.weight.clone()
    run = trainer(tmp_path, steps=2)
    run.fit(module, small_data())
    assert torch.isfinite(run.callback_metrics["train/loss"])
    assert not torch.equal(before, module.predictor.alpha_head.weight)


@pytest.mark.parametrize("name", ["tiny.yaml", "deepseek-r1-distill-qwen-1.5b.yaml"])
def test_configs_parse(name, capsys):
    from lightning_tokens.cli import build_cli

    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(ROOT / "lightning_tokens/configs/budget" / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lightning_tokens.budget.BudgetPredictorModule" in printed and "TraceDataModule" in printed


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="BudgetPredictorModule.window"):
        BudgetPredictorModule(ModelSpec(config=tiny_config("llama")), window=-1)
    with pytest.raises(ValueError, match="TraceDataModule.max_length"):
        TraceDataModule(max_length=1)
