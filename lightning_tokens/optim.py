"""Optimizers (AdamW, bitsandbytes 8-bit and paged AdamW), warm-up + decay schedules and exact resumption
(:class:`ResumesExactly`), shared by modules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_tokens.checks import check_numbers

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
        if not isinstance(self.betas, Sequence) or len(self.betas) != 2:
            raise ValueError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        check_numbers("OptimizerConfig", lr=(self.lr, "> 0"), weight_decay=(self.weight_decay, ">= 0"),
                      **{f"betas[{i}]": (beta, "in [0, 1)") for i, beta in enumerate(self.betas)},
                      warmup=(self.warmup, ">= 0"), min_lr_ratio=(self.min_lr_ratio, "in [0, 1]"))


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


TOTAL_STEPS_KEY = "total_training_steps"
RNG_KEY = "rng_states"


class ResumesExactly:
    """LightningModule mixin (listed before ``LightningModule``): a run resumed from a checkpoint, in the middle of an
    epoch too, continues as the uninterrupted run would.

    * :meth:`total_training_steps` gives ``configure_optimizers`` the run's length for the learning-rate schedule.
      Lightning's ``estimated_stepping_batches`` sets up the training data; read while resuming, that happens before
      the loop state is restored and the loader's position is lost. So the length is saved in every checkpoint and
      read back from it when the trainer resumes (extending a resumed run keeps the first run's schedule). Strategies
      that restore a checkpoint after setting up (FSDP, ``ModelParallelStrategy``, DeepSpeed) configure the optimizers
      before it is read: there the position is kept only when ``max_steps`` alone bounds the run (``max_epochs``
      unset), as Lightning then estimates nothing.
    * The states of torch's random generators (the CPU's and the module's accelerator's: dropout, sampling) of every
      process are saved in every checkpoint and set back just before the resumed run's first training batch, each
      process its own. Lightning itself draws from them when it opens a data loader, so a run resumed from a
      checkpoint taken just before a validation or the end of an epoch draws differently from there on.

    A subclass overriding ``on_save_checkpoint``, ``on_load_checkpoint`` or ``on_train_batch_start`` calls ``super()``.
    """

    _total_steps: Optional[int] = None
    _resumed: Optional[dict[str, Any]] = None  # read by on_load_checkpoint, used by a fit resuming from it

    def total_training_steps(self) -> int:
        """Optimizer steps of the whole run: the checkpoint's when the trainer resumes from one, else
        ``trainer.estimated_stepping_batches``."""
        saved = (self._resumed or {}).get(TOTAL_STEPS_KEY) if self.trainer.ckpt_path is not None else None
        self._total_steps = int(saved if saved is not None else self.trainer.estimated_stepping_batches)
        return self._total_steps

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._total_steps is not None:
            checkpoint[TOTAL_STEPS_KEY] = self._total_steps
        checkpoint[RNG_KEY] = _every_process(_rng_states(self.device))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed = {key: checkpoint.get(key) for key in (TOTAL_STEPS_KEY, RNG_KEY)}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        resumed, self._resumed = self._resumed, None
        states = (resumed or {}).get(RNG_KEY)
        if states is None or self.trainer.ckpt_path is None:
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(f"{type(self).__name__}: the checkpoint holds the random generators of {len(states)} "
                           f"processes, this run has {self.trainer.world_size}; they start where they are")
            return
        _set_rng_states(states[self.global_rank], self.device)


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    accelerator = getattr(torch, device.type, None) if device.type != "cpu" else None
    if accelerator is not None and hasattr(accelerator, "get_rng_state"):
        states[device.type] = accelerator.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"].cpu())
    if device.type != "cpu" and device.type in states:
        getattr(torch, device.type).set_rng_state(states[device.type].cpu(), device)


def _every_process(value: Any) -> list[Any]:
    """``value`` of every process, by rank (all of them call this)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def configure(config: OptimizerConfig, groups: list[dict], total_steps: int) -> dict:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer and a per-step schedule."""
    optimizer = build_optimizer(config, groups)
    warmup_steps = int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, config.schedule, config.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
