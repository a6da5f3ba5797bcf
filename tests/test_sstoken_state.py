"""TokenSelection state: the EMA history follows the naive EMA, checkpoints resume exactly, DDP with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from conftest import tiny_config
from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.sstoken import TokenSelection
from lightning_tokens.sstoken.history import EmaWeights
from test_sstoken import make_batch


class UserModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = causal_lm_of(load_causal_lm(ModelSpec(config=tiny_config("llama")))[0])

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Snapshots(pl.Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append([p.detach().clone() for p in pl_module.net.parameters() if p.requires_grad])


def loader():
    return DataLoader([make_batch(100, seed=s) for s in (1, 2)], batch_size=None)


def fit(epochs, callbacks, ckpt_path=None, module=None):
    module = module or UserModule()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module


def selection():
    return TokenSelection(history="ema", ema_decay=0.5, warmup=1)


def test_ema_history_follows_the_naive_ema_and_resumes_exactly(tmp_path):
    snapshots = Snapshots()
    straight = selection()
    _, module_a = fit(2, [straight, snapshots])
    assert isinstance(straight.source, EmaWeights) and straight.source.updates == 4
    init = [p.detach() for p in UserModule().net.parameters() if p.requires_grad]
    expected = init
    for params in snapshots.params:
        expected = [0.5 * s + 0.5 * p for s, p in zip(expected, params)]
    for got, want in zip(straight.source.shadow, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    first = selection()
    trainer, _ = fit(1, [first])
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = selection()
    _, module_b = fit(2, [resumed], ckpt_path=tmp_path / "half.ckpt")
    assert resumed.source.updates == 4 and resumed.global_step == 4
    for a, b in zip(module_a.parameters(), module_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.source.shadow, resumed.source.shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import lightning.pytorch as pl
    import torch
    from lightning_tokens import CausalLMModule, ModelSpec, ReasoningTask, SFTDataModule
    from lightning_tokens.sstoken import TokenSelection

    out = sys.argv[1]
    config = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    module = CausalLMModule(model=ModelSpec(config=config), max_new_tokens=2)
    data = SFTDataModule(task=ReasoningTask(num_train=16, num_val=4, noise=0.25, noisy_fraction=0.3),
                         batch_size=4, max_length=64)
    selection = TokenSelection(history="ema", warmup=1)
    kept = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kept.append(trainer.callback_metrics["selection/kept_fraction"].item())

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[selection, Record()])
    trainer.fit(module, datamodule=data)
    weights = sum(p.double().sum().item() for p in module.parameters())
    shadow = sum(s.double().sum().item() for s in selection.source.shadow)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"weights": weights, "shadow": shadow, "kept": kept, "updates": selection.source.updates}, f)
""")


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_selection.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were all-reduced
    assert ranks[0]["shadow"] == ranks[1]["shadow"]  # and every rank's EMA saw the same weights
    assert ranks[0]["updates"] == ranks[1]["updates"] == 2
    for rank in ranks:
        assert len(rank["kept"]) == 2 and all(0.6 <= k < 0.8 for k in rank["kept"])


def test_a_resumed_run_keeps_its_warmup_length():
    from types import SimpleNamespace

    fresh, resumed = TokenSelection(mode="attention", warmup=0.5), TokenSelection(mode="attention", warmup=0.5)
    trainer = SimpleNamespace(estimated_stepping_batches=40, global_step=0)
    fresh.on_train_start(trainer, None)
    assert fresh.warmup_steps == 20
    resumed.load_state_dict({"global_step": 3, "forwards": 3, "warmup_steps": 7})
    resumed.on_train_start(SimpleNamespace(estimated_stepping_batches=40, global_step=3), None)
    assert resumed.warmup_steps == 7 and resumed.global_step == 3
