"""4-bit weights on every CPU: no layer left on bitsandbytes' AVX512-BF16 repacking path, exact gradients, saves
and reloads after validation.

Every test here runs as on a CPU with AVX512-BF16 (the autouse fixture in conftest.py), so a 4-bit layer the
package forgets to pin takes the repacking path and fails: on hidden size 32 it raises, on wider layers it
gives wrong outputs and gradients, whichever CPU runs the test.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_tokens import (
    BudgetPredictorModule,
    CausalLMModule,
    ModelSpec,
    QuietSTaRModule,
    SFTDataModule,
    TokenLossDispatcher,
    TokenSelection,
    keep_4bit_weights_unpacked,
    load_causal_lm,
)
from lightning_tokens.cli import build_cli
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import causal_lm_of, load_frozen_causal_lm
from lightning_tokens.quantization import bnb_config, restore_4bit_quant_states
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_TASK = dict(num_train=16, num_val=4)


def four_bit_layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def qlora_spec(**overrides) -> ModelSpec:
    options = dict(config=tiny_config(), quantization="nf4", compute_dtype="float32",
                   lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    options.update(overrides)
    return ModelSpec(**options)


def test_an_unpinned_layer_is_repacked_by_an_eval_forward_and_a_pinned_one_is_not():
    # The bitsandbytes behaviour the package guards against (the upstream repro), and the guard itself.
    x = torch.randn(3, 32)
    layer = bnb.nn.Linear4bit(32, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    assert layer.support_avx512bf16_for_cpu  # the fixture reached the layer
    layer.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid"):
        layer(x)

    pinned = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    stored = pinned.weight.data.clone()
    x = torch.randn(3, 64)
    expected = x @ bnb.functional.dequantize_4bit(pinned.weight.data, pinned.weight.quant_state).t()
    assert keep_4bit_weights_unpacked(pinned) == 1 and not pinned.support_avx512bf16_for_cpu
    pinned.eval()
    with torch.no_grad():
        out = pinned(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(pinned.weight.data, stored)
    assert not getattr(pinned.weight.quant_state, "packing_format_for_cpu", False)


def test_an_already_repacked_model_is_refused_with_a_clear_error():
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu").eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="already repacked.*Load the model again"):
        keep_4bit_weights_unpacked(torch.nn.Sequential(layer))


def _selection_history_copy():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config()))
    selection = TokenSelection(history_quantization="nf4", warmup=0)
    selection.attach(model)
    selection.detach()
    return selection.source.model


def _rho1_reference():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config()))
    selection = TokenSelection(mode="rho1", reference=ModelSpec(config=tiny_config(), quantization="nf4",
                                                                 compute_dtype="float32"))
    selection.attach(model)
    selection.detach()
    return selection.source.model


def _users_own_model(tmp_path):
    # Loaded by the user with plain transformers, then handed to a callback through the dispatcher.
    model, _ = load_causal_lm(ModelSpec(config=tiny_config()))
    model.save_pretrained(tmp_path)
    own = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config("nf4", torch.float32),
                                               device_map={"": "cpu"})
    assert all(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(own))
    TokenLossDispatcher.for_model(own).add(object())
    return own


SOURCES = {
    "load_causal_lm nf4": lambda tmp_path: load_causal_lm(qlora_spec())[0],
    "load_causal_lm fp4": lambda tmp_path: load_causal_lm(qlora_spec(quantization="fp4"))[0],
    "load_frozen_causal_lm": lambda tmp_path: load_frozen_causal_lm(qlora_spec(lora=None))[0],
    "selection history copy": lambda tmp_path: _selection_history_copy(),
    "rho1 reference": lambda tmp_path: _rho1_reference(),
    "budget frozen lm": lambda tmp_path: BudgetPredictorModule(model=qlora_spec(lora=None)).model,
    "quiet-star": lambda tmp_path: QuietSTaRModule(model=qlora_spec()).model,
    "user's own model": _users_own_model,
}


@pytest.mark.parametrize("source", SOURCES)
def test_no_4bit_layer_the_package_loads_or_trains_keeps_the_repacking_path(source, tmp_path):
    layers = four_bit_layers(SOURCES[source](tmp_path))
    assert layers, "no 4-bit layer built: the check would pass vacuously"
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)


def _batch(tokenizer, rows=4):
    texts = [f"Compute {a} + {b}. <think> {a} + {b} = {a + b} </think> {a + b}" for a, b in
             [(12, 7), (3, 45), (100, 1), (8, 8)][:rows]]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels)


def _lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("hidden", [32, 64])
@pytest.mark.parametrize("double_quant", [True, False])
def test_gradients_after_an_eval_forward_under_no_grad_equal_those_before(hidden, double_quant):
    # Random (not zero) LoRA B, as after some training: then the A gradients of layer 0 need the gradient that
    # flows back through every 4-bit base weight above it.
    spec = qlora_spec(config=tiny_config(hidden_size=hidden, intermediate_size=2 * hidden, initializer_range=0.2),
                      double_quant=double_quant, lora={"r": 4, "lora_alpha": 8, "init_lora_weights": False})
    model, tokenizer = load_causal_lm(spec)
    batch = _batch(tokenizer)
    stored = {name: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
              for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    before = _lora_gradients(model, batch)
    assert before["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(**batch)  # what validation, a history forward or generation does
    model.train()
    after = _lora_gradients(model, batch)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(m.weight.data, stored[name][0])
            assert torch.equal(m.weight.quant_state.absmax, stored[name][1])


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_checkpoint_saved_after_validation_reloads_the_same_weights(double_quant, tmp_path):
    module = CausalLMModule(model=qlora_spec(double_quant=double_quant), max_new_tokens=2)
    initial = dequantized(module)
    data = SFTDataModule(task=ReasoningTask(**SMALL_TASK), batch_size=4, max_length=64)
    trainer = pl.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1,
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert "val/loss" in trainer.callback_metrics
    trainer.save_checkpoint(tmp_path / "after-validation.ckpt")
    reloaded = CausalLMModule.load_from_checkpoint(tmp_path / "after-validation.ckpt", weights_only=True)
    for name, weight in dequantized(reloaded).items():
        assert torch.equal(weight, initial[name]), name
    trained, restored = module.state_dict(), reloaded.state_dict()
    assert trained.keys() == restored.keys()
    for key in trained:
        assert torch.equal(trained[key], restored[key]), key


def test_restoring_quant_states_rebuilds_another_bases_weights_bit_for_bit():
    source, _ = load_causal_lm(qlora_spec(seed=0))
    target, _ = load_causal_lm(qlora_spec(seed=1))
    assert not all(torch.equal(a, b) for a, b in zip(dequantized(source).values(), dequantized(target).values()))
    state = source.state_dict()
    assert restore_4bit_quant_states(target, state) == len(four_bit_layers(target))
    target.load_state_dict(state)
    for name, weight in dequantized(target).items():
        assert torch.equal(weight, dequantized(source)[name]), name


def test_fit_of_the_qlora_yaml_with_validation_inside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", str(ROOT / "lightning_tokens/configs/sft/qlora-tiny.yaml"),
                     "--data.init_args.task.num_train", "64", "--data.init_args.task.num_val", "8",
                     "--data.init_args.batch_size", "16", "--model.init_args.max_new_tokens", "4",
                     "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 8
    assert torch.isfinite(metrics["val/loss"]) and torch.isfinite(metrics["train/loss"])
    model = causal_lm_of(cli.model.model)
    assert four_bit_layers(model) and not any(layer.support_avx512bf16_for_cpu for layer in four_bit_layers(model))
    assert (tmp_path / "runs/sft-qlora-tiny/checkpoints/last.ckpt").is_file()



def test_quiet_star_loads_qlora_checkpoints_bit_for_bit(tmp_path):
    lora = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
    sft = CausalLMModule(model=qlora_spec(lora=lora))
    torch.save({"state_dict": sft.state_dict()}, tmp_path / "sft.ckpt")
    # Other seeds: the bases differ until the checkpoints are loaded.
    started = QuietSTaRModule(model=qlora_spec(seed=1, lora=lora), init_checkpoint=str(tmp_path / "sft.ckpt"))
    expected = dequantized(sft.model)
    for name, weight in dequantized(started.model).items():
        assert torch.equal(weight, expected[name]), name
    lora_weights = {k: v for k, v in sft.model.state_dict().items() if "lora_" in k}
    assert lora_weights and all(torch.equal(started.model.state_dict()[k], v) for k, v in lora_weights.items())
    checkpoint = {"state_dict": started.state_dict()}
    resumed = QuietSTaRModule(model=qlora_spec(seed=2, lora=lora))
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    for (name, a), (_, b) in zip(started.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
