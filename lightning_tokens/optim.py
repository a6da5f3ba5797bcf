"""Optimizers (AdamW, bitsandbytes 8-bit and paged AdamW) and warm-up + decay schedules, shared by modules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"]
ScheduleName = Literal["cosine", "linear", "constant"]


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
        name: ``"adamw"`` (torch), ``"adamw8bit"``, ``"paged_adamw8bit"`` or ``"paged_adamw"``
            (bitsandbytes). Default ``"adamw"``.
        lr: Peak learning rate. Default ``3e-4``.
        weight_decay: Decoupled weight decay, applied to matrices only (not biases, norms). Default ``0.0``.
        betas: Adam betas. Default ``(0.9, 0.999)``.
        warmup: Linear warm-up length: steps when >= 1, a fraction of all training steps when < 1.
            Default ``0.03``.
        schedule: Decay after warm-up: ``"cosine"``, ``"linear"`` or ``"constant"``. Default ``"cosine"``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``. Default ``0.0``.
    """

    name: OptimizerName = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.03
    schedule: ScheduleName = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"):
            raise ValueError(f"OptimizerConfig.name: unknown optimizer {self.name!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"OptimizerConfig.schedule: unknown schedule {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"OptimizerConfig.lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"OptimizerConfig.warmup must be >= 0, got {self.warmup}")


torch.serialization.add_safe_globals([OptimizerConfig])


def parameter_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices with ``weight_decay``, vectors (biases, norms) without."""
    decay, no_decay = [], []
    for _, parameter in named_parameters:
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(config: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer named by ``config`` over parameter ``groups``."""
    if not groups:
        raise ValueError("no trainable parameters: nothing for the optimizer to update")
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW}[config.name]
    return cls(groups, lr=config.lr, betas=config.betas)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up from 0, then the decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def total_training_steps(module: Any) -> int:
    """Optimizer steps of the whole run, remembered on ``module`` (see :func:`remember_total_steps`).

    Lightning's ``estimated_stepping_batches`` sets up the training data; called while resuming, that
    happens before the loop state is restored and the data loader's position is lost. So the value is
    computed once, saved in every checkpoint and read back from it on resume.
    """
    steps = getattr(module, "_total_training_steps", None)
    if steps is None:
        steps = int(module.trainer.estimated_stepping_batches)
        module._total_training_steps = steps
    return steps


def remember_total_steps(module: Any, checkpoint: dict, loading: bool) -> None:
    """Save (``loading=False``) or restore the run's total steps in a LightningModule checkpoint."""
    if loading:
        module._total_training_steps = checkpoint.get("total_training_steps")
    elif getattr(module, "_total_training_steps", None) is not None:
        checkpoint["total_training_steps"] = module._total_training_steps


def configure(config: OptimizerConfig, groups: list[dict], total_steps: int) -> dict:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer and a per-step schedule."""
    optimizer = build_optimizer(config, groups)
    warmup_steps = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, config.schedule, config.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
