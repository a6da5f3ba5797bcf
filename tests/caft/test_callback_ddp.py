"""ConceptAwareFineTuning (CAFT stage 2) under DDP: two CPU processes (gloo) train trainable heads in lockstep."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import sys
    import lightning.pytorch as pl
    import torch
    from lightning_tokens.data.module import SFTDataModule
    from lightning_tokens.data.reasoning_task import ReasoningTask
    from lightning_tokens.caft import ConceptAwareFineTuning, MultiTokenHeads
    from lightning_tokens.modeling import ModelSpec
    from lightning_tokens.sft import CausalLMModule
    from lightning_tokens.optim import OptimizerConfig

    torch.set_flush_denormal(True)
    out = sys.argv[1]
    config = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    module = CausalLMModule(model=ModelSpec(config=config), optimizer=OptimizerConfig(lr=1e-2, warmup=0),
                            max_new_tokens=0)
    callback = ConceptAwareFineTuning(heads_path=out + "/heads", num_heads=2, beta=1.0, train_heads=True)
    data = SFTDataModule(task=ReasoningTask(num_train=32, num_val=8), max_length=64, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    torch.save({k: v.cpu() for k, v in module.caft_heads.state_dict().items()}, f"{out}/rank{trainer.global_rank}.pt")
''')


def test_trainable_heads_stay_in_sync_under_ddp(tmp_path):
    from lightning_tokens.caft import MultiTokenHeads
    from lightning_tokens.modeling import ModelSpec, load_causal_lm

    config = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    model, _ = load_causal_lm(ModelSpec(config=config))
    initial = MultiTokenHeads(model, num_heads=2)
    initial.save(tmp_path / "heads")
    script = tmp_path / "ddp_caft.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys() == initial.state_dict().keys()
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name  # gradients were all-reduced
    assert any(not torch.equal(rank0[n], initial.state_dict()[n]) for n in rank0)  # and the heads trained
