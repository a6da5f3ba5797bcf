"""QuietSTaRModule training under LoRA, nf4 QLoRA and DDP (2 CPU processes, gloo), and on DeepSeek's MoE and latent
attention; checkpoints keep the thought state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec, is_quantized
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.quiet_star import QuietSTaRModule
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(n_thoughts=2, thought_length=2, n_ahead_talk=2, max_new_tokens=3)


def data() -> SFTDataModule:
    return SFTDataModule(task=ReasoningTask(num_train=8, num_val=4), batch_size=4, max_length=40)


def trainer(tmp_path, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   default_root_dir=tmp_path, gradient_clip_val=1.0)
    return Trainer(**{**options, **kwargs})


def snapshot(module: QuietSTaRModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("quantization,think_at", [(None, "all"), ("nf4", "all"), ("nf4", 0.3)])
def test_training_under_lora_and_qlora_moves_adapters_head_and_thought_tokens(tmp_path, quantization, think_at):
    spec = ModelSpec(config=tiny_config("llama"), lora={"r": 4, "lora_alpha": 8}, quantization=quantization)
    module = QuietSTaRModule(spec, optimizer=OptimizerConfig(lr=1e-2, warmup=0), policy_weight=1.0, think_at=think_at,
                             **SMALL)
    assert is_quantized(module.model) == (quantization is not None)
    with torch.no_grad():
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.1)
    before = snapshot(module)
    trainer(tmp_path).fit(module, datamodule=data())
    after = snapshot(module)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "thought_embeddings.scaled" in changed
    assert any(name.startswith("mixing_head.") for name in changed)
    assert any("lora_" in name for name in changed)
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    assert frozen and not changed.intersection(frozen)
    assert all(torch.isfinite(p).all() for p in after.values())


def test_checkpoint_keeps_thought_embeddings_head_and_rows(tmp_path):
    spec = ModelSpec(config=tiny_config("gpt2"))
    module = QuietSTaRModule(spec, optimizer=OptimizerConfig(lr=1e-2, warmup=0), **SMALL)
    initial = module.thought_embeddings().detach().clone()
    run = trainer(tmp_path, limit_val_batches=1)
    run.fit(module, datamodule=data())
    assert not torch.equal(module.thought_embeddings().detach(), initial)  # they trained
    assert "val/exact_match" in run.callback_metrics and "val/mixed_nll" in run.callback_metrics
    path = tmp_path / "quiet.ckpt"
    run.save_checkpoint(path)
    loaded = QuietSTaRModule.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(loaded.thought_embeddings.scaled, module.thought_embeddings.scaled, rtol=0, atol=0)
    for name, value in module.mixing_head.state_dict().items():
        assert torch.equal(loaded.mixing_head.state_dict()[name], value)
    assert torch.equal(loaded.lm.get_input_embeddings().weight, module.lm.get_input_embeddings().weight)
    assert (loaded.start_id, loaded.end_id) == (module.start_id, module.end_id)
    exported = module.export(tmp_path / "export")
    state = torch.load(exported / "quiet_star.pt", weights_only=False)
    assert torch.equal(state["thought_embeddings"]["scaled"], module.thought_embeddings.scaled.detach())
    rows = module.lm.get_input_embeddings().weight[[module.start_id, module.end_id]]
    torch.testing.assert_close(rows, module.thought_embeddings().detach())


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from lightning.pytorch import Trainer
    from tests.tiny import tiny_config
    from lightning_tokens.data.module import SFTDataModule
    from lightning_tokens.data.reasoning_task import ReasoningTask
    from lightning_tokens.modeling import ModelSpec
    from lightning_tokens.optim import OptimizerConfig
    from lightning_tokens.quiet_star import QuietSTaRModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = QuietSTaRModule(ModelSpec(config=tiny_config("qwen2")), optimizer=OptimizerConfig(lr=1e-2, warmup=0),
                             n_thoughts=2, thought_length=2, n_ahead_talk=2, policy_weight=1.0)
    with torch.no_grad():
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.1)
    data = SFTDataModule(task=ReasoningTask(num_train=16, num_val=4), batch_size=2, max_length=40)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    state = {"rank": trainer.global_rank, "steps": trainer.global_step,
             "embeddings": module.thought_embeddings.scaled.detach().flatten()[:8].tolist(),
             "head": module.mixing_head.net[-1].weight.detach().flatten()[:8].tolist()}
    with open(sys.argv[1] + f"/rank{trainer.global_rank}.json", "w") as handle:
        json.dump(state, handle)
""")


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert ranks[0]["embeddings"] == ranks[1]["embeddings"] and ranks[0]["head"] == ranks[1]["head"]
    assert any(v != 0 for v in ranks[0]["head"])


def test_init_checkpoint_loads_an_sft_module_before_adding_thought_tokens(tmp_path):
    from lightning_tokens.sft import CausalLMModule

    spec = ModelSpec(config=tiny_config("llama"))
    sft = CausalLMModule(spec)
    with torch.no_grad():
        for parameter in sft.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path / "sft.ckpt"
    torch.save({"state_dict": sft.state_dict()}, path)
    module = QuietSTaRModule(spec, init_checkpoint=str(path), **SMALL)
    vocab = sft.model.get_input_embeddings().weight.shape[0]
    torch.testing.assert_close(module.lm.get_input_embeddings().weight[:vocab], sft.model.get_input_embeddings().weight)
    torch.testing.assert_close(module.lm.model.layers[0].mlp.up_proj.weight,
                               sft.model.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="init_checkpoint"):
        QuietSTaRModule(spec, init_checkpoint=str(tmp_path / "missing.ckpt"))


def test_training_moves_the_moe_router_and_the_latent_attention(tmp_path):
    """float32, transformers' default experts implementation: a plain fit of two steps."""
    spec = ModelSpec(config=tiny_config("deepseek_v3", v_head_dim=12))
    module = QuietSTaRModule(spec, optimizer=OptimizerConfig(lr=1e-2, warmup=0), n_thoughts=2, thought_length=2,
                             n_ahead_talk=2, max_new_tokens=3)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    data = SFTDataModule(task=ReasoningTask(num_train=8, num_val=4), batch_size=4, max_length=40)
    Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            default_root_dir=tmp_path).fit(module, datamodule=data)
    changed = {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}
    for part in (".mlp.gate.weight", ".mlp.experts.", ".self_attn.kv_b_proj.", ".self_attn.o_proj.",
                 "thought_embeddings.scaled"):
        assert any(part in name for name in changed), part
    assert all(torch.isfinite(p).all() for p in module.parameters())
