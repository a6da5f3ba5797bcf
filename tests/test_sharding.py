"""Sharded training (FSDP2 under ModelParallelStrategy) with two CPU processes (gloo), against one process.

Each sharded run records the batch every rank trained on and its loss; the test replays those batches in one
process (the two ranks' mean loss per step, which is what FSDP2's averaged gradients optimise) and compares the
losses and the final weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_tokens import CausalLMModule, ReasoningTask, SFTDataModule
    from lightning_tokens.modeling import ModelSpec
    from lightning_tokens.optim import OptimizerConfig

    torch.set_flush_denormal(True)
    out, steps, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

    class Record(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append({"batch": {k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)},
                              "loss": outputs["loss"].detach().cpu()})

    torch.manual_seed(0)
    module = CausalLMModule(model=ModelSpec(config=options["config"], lora=options.get("lora")),
                            optimizer=OptimizerConfig(lr=1e-2, warmup=0, schedule="constant"), max_new_tokens=0)
    data = SFTDataModule(task=ReasoningTask(num_train=32, num_val=8), max_length=64, batch_size=4,
                         packing=options.get("packing", False))
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=steps, logger=False, callbacks=[record],
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"seen": record.seen, "weights": weights if trainer.global_rank == 0 else None},
               f"{out}/rank{trainer.global_rank}.pt")
''')


def sharded_run(tmp_path: Path, **options) -> list[dict]:
    import json

    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "PL_DISABLE_FORK": "1"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(STEPS), json.dumps(options)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def replay(ranks: list[dict], **options) -> tuple[list[list[torch.Tensor]], dict]:
    """One process trains on the ranks' batches, step by step, on the mean of their losses."""
    from lightning_tokens import CausalLMModule
    from lightning_tokens.data.packing import model_inputs
    from lightning_tokens.modeling import ModelSpec
    from lightning_tokens.optim import OptimizerConfig, build_optimizer, parameter_groups
    from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher

    torch.manual_seed(0)
    module = CausalLMModule(model=ModelSpec(config=options["config"], lora=options.get("lora")),
                            optimizer=OptimizerConfig(lr=1e-2, warmup=0, schedule="constant"), max_new_tokens=0)
    model = module.model.train()
    TokenLossDispatcher.for_model(model).add(PlainLoss())
    optimizer = build_optimizer(module.optim, parameter_groups(module.named_parameters(), module.optim.weight_decay))
    losses = []
    for step in range(STEPS):
        step_losses = [model(**model_inputs(rank["seen"][step]["batch"])).loss for rank in ranks]
        (sum(step_losses) / len(step_losses)).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append([loss.detach() for loss in step_losses])
    return losses, {name: value.detach() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("options", [dict(config=TINY), dict(config=TINY, packing=True),
                                     dict(config=TINY, lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})],
                         ids=["full", "packed", "lora"])
def test_sharded_sft_matches_one_process_on_the_same_batches(tmp_path, options):
    ranks = sharded_run(tmp_path, **options)
    losses, weights = replay(ranks, **options)
    assert not torch.equal(ranks[0]["seen"][0]["batch"]["input_ids"][:1], ranks[1]["seen"][0]["batch"]["input_ids"][:1])
    for step in range(STEPS):
        for rank in (0, 1):
            torch.testing.assert_close(ranks[rank]["seen"][step]["loss"], losses[step][rank], rtol=0, atol=1e-5)
    sharded = ranks[0]["weights"]
    assert sharded.keys() == weights.keys()
    moved = 0
    for name, value in weights.items():
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-5, msg=name)
        moved += 1
    assert moved
