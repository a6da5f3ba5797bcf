"""TokenSelection (sstoken/callback.py) under DDP: two CPU processes keep the same weights, EMA and selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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
