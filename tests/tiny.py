"""Tiny models built from a config (never downloaded), padded token rows, a quiet CPU Trainer and a callback that
interrupts it, shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

TINY_SIZES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
    "deepseek_v3": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_mtp_layers=2),
    "glm4_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4,
                     num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, num_mtp_layers=2),
}


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    """A config dict of a 2-layer, 32-wide model of ``model_type``."""
    return {"model_type": model_type, **TINY_SIZES[model_type], **overrides}


def padded_rows(rows: list[list[int]], width: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: token rows padded with 0 to ``width`` on ``side`` (``"left"`` or ``"right"``)."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        place = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, place], mask[i, place] = torch.tensor(row), 1
    return ids, mask


def trainer(**kwargs):
    """A one-device CPU ``Trainer`` without logger, checkpoints, progress bar, summary or validation; ``kwargs``
    override any of these and add others."""
    import lightning.pytorch as pl

    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    options.update(kwargs)
    return pl.Trainer(**options)


class Interrupt(pl.Callback):
    """Stops the run (as Ctrl-C would) once ``step`` optimizer steps are done (and checkpointed, where a
    ``ModelCheckpoint`` saves every step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
