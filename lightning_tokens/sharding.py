"""Sharded training with FSDP2 under Lightning's ``ModelParallelStrategy``.

A LightningModule shards its causal LM in ``configure_model``: every decoder layer, then the whole model, with
``torch.distributed.fsdp.fully_shard`` on the strategy's data-parallel mesh. Parameters, gradients and
optimizer state are then split across the data-parallel ranks; each decoder layer's weights are gathered just
for its forward and backward. This runs on GPUs (NCCL) and on CPUs (gloo), so it is tested like DDP::

    Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2)

Beyond the layers:

- Code that calls a model's pieces itself (Quiet-STaR's thought passes) runs as the sharded model's forward
  (:func:`call_as_forward`), so FSDP2 gathers the root around it.
- Small modules every rank holds whole beside a sharded model (Quiet-STaR's mixing head, separate CAFT
  unembeddings) have their gradients averaged after each backward (:func:`average_gradients`), and gradient
  clipping takes sharded and whole gradients together (:func:`clip_mixed_gradients`).
- Weights swapped for one forward (TokenSelection's EMA history) go into the local shards of resharded units and
  into the parameter slots of the gathered root (:func:`resharded`, :func:`local_shard`).

Quantized (bitsandbytes) weights cannot be sharded by FSDP2: such a model gets one clear error. Lightning's older
``FSDPStrategy`` (FSDP1) gets one warning naming ``ModelParallelStrategy`` (:func:`warn_if_fsdp1`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from lightning_tokens.modeling import decoder_layers, is_quantized

#: Trainer precisions and the parameter / reduction dtypes of FSDP2's mixed precision for each.
_PRECISIONS = {"bf16-mixed": (torch.bfloat16, torch.float32), "16-mixed": (torch.float16, torch.float32),
               "bf16-true": (torch.bfloat16, torch.bfloat16), "16-true": (torch.float16, torch.float16)}


def data_parallel_mesh(pl_module: Any) -> Optional[Any]:
    """The data-parallel device mesh ``ModelParallelStrategy`` gave ``pl_module``; ``None`` under other strategies."""
    try:
        mesh = pl_module.device_mesh
    except (AttributeError, RuntimeError):
        return None
    if mesh is None:
        return None
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def mixed_precision(precision: Any) -> Optional[Any]:
    """FSDP2's ``MixedPrecisionPolicy`` for a Trainer ``precision`` (``"bf16-mixed"``, ...), or ``None`` for 32-bit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = _PRECISIONS.get(str(precision))
    if dtypes is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtypes[0], reduce_dtype=dtypes[1])


def shards_with_fsdp2(trainer: Any) -> bool:
    """Whether ``trainer`` trains under ``ModelParallelStrategy`` (FSDP2), so modules get sharded in
    ``configure_model``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def warn_if_fsdp1(trainer: Any, who: str) -> None:
    """One warning when ``trainer`` runs Lightning's ``FSDPStrategy`` (FSDP1, ``strategy: fsdp``), which ``who``
    is not tested under: its flat parameters hide the weights that callbacks read and swap."""
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities import rank_zero_warn

    if isinstance(getattr(trainer, "strategy", None), FSDPStrategy):
        rank_zero_warn(f"{who}: strategy 'fsdp' (FSDP1) is not tested with lightning-tokens; shard with "
                       "ModelParallelStrategy(data_parallel_size=<GPUs>, tensor_parallel_size=1) (FSDP2) instead, "
                       "which every module and callback of lightning-tokens supports")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_causal_lm(model: nn.Module, mesh: Any, precision: Any = None,
                    extra: tuple[nn.Module, ...] = (), layers: bool = True) -> None:
    """Shard ``model`` (a causal LM, PEFT-wrapped or not) with FSDP2: each decoder layer, then the whole model.

    Modules in ``extra`` (auxiliary heads, say) are sharded as units of their own, before the model. Calling it
    again on a sharded model does nothing, so ``configure_model`` may run more than once.

    Args:
        model: The model.
        mesh: The data-parallel ``DeviceMesh``.
        precision: The Trainer's precision, for the mixed precision policy. Default ``None``: full precision.
        extra: More modules to shard. Default ``()``.
        layers: Make each decoder layer a unit of its own, gathered for its forward and again for its backward.
            ``False``: the whole model is one unit, gathered once per step, its gradients and optimizer state
            sharded; for code that runs a layer many times in one step with backward passes that interleave
            (a KV cache carried across calls), where a layer's own unit would be resharded while still needed.
            Default ``True``.

    Raises:
        ValueError: The model holds bitsandbytes-quantized weights.
    """
    if is_sharded(model):
        return
    if is_quantized(model):
        raise ValueError("ModelParallelStrategy (FSDP2) cannot shard bitsandbytes 4-bit or 8-bit weights; train a "
                         "quantized model with one device per process (strategy 'ddp') instead")
    shard_modules((*(decoder_layers(model) if layers else ()), *extra, model), mesh, precision)


def shard_modules(modules: tuple[nn.Module, ...], mesh: Any, precision: Any = None) -> None:
    """Shard each of ``modules``, in order, as a unit of its own (a model's layers, or trainable heads and predictors
    beside a frozen, replicated model); already sharded ones are left alone. Each must be called as a module (its
    hooks gather and reduce it)."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision)
    for module in modules:
        if not is_sharded(module):
            fully_shard(module, mesh=mesh, **({"mp_policy": policy} if policy is not None else {}))


def call_as_forward(module: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` run as ``module``'s forward, so that ``module``'s hooks wrap it: for an FSDP2 root, its
    weights are gathered before and its backward is registered on the tensors returned after. For code that calls
    a model's pieces one by one (an embedding, the decoder many times, the output head) instead of its forward.

    What ``function`` returns must hold the tensors a backward starts from in a tuple, list or dict (FSDP2 looks
    for them there), e.g. ``(loss, details)``.
    """
    module.forward = function  # an instance attribute, found before the class's forward
    try:
        return module(*args)
    finally:
        del module.forward


@contextlib.contextmanager
def resharded(model: nn.Module) -> Iterator[None]:
    """Within: every FSDP2 unit of ``model`` holds its shard only, so what is written into the local shards is what
    the next forward gathers. On exit the units are resharded again and the root (which FSDP2 keeps gathered from
    the forward to the backward) is gathered again from its shards, into the storage the autograd graph of the
    training forward refers to, like any unit FSDP2 regathers for the backward."""
    units = [module for module in model.modules() if is_sharded(module)]
    for unit in units:
        unit.reshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        if is_sharded(model):
            model.unshard()


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: its local shard for a DTensor (a view), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def average_gradients(parameters: Any, mesh: Any) -> None:
    """Average the gradients of parameters every rank holds whole (not sharded) over the data-parallel ``mesh``, as
    DDP would; for small modules beside a sharded model (call it after each backward)."""
    import torch.distributed as dist

    group, size = mesh.get_group(), mesh.size()
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)  # a sum (gloo has no average), divided below
            param.grad.div_(size)


def clip_mixed_gradients(module: nn.Module, clip_value: Optional[float], algorithm: Optional[str]) -> bool:
    """Clip the gradients of ``module`` when it mixes FSDP2-sharded parameters (DTensors) with parameters every rank
    holds whole, which torch's clipping cannot take together; ``True`` if it did, ``False`` to leave clipping to
    Lightning (nothing to clip, or nothing mixed). For ``configure_gradient_clipping``.

    ``"norm"`` (the default algorithm) scales every gradient by ``min(1, clip_value / (total_norm + 1e-6))``, the
    total norm over all of them (the sharded part gathered), as ``torch.nn.utils.clip_grad_norm_``; ``"value"``
    clamps each gradient to ``[-clip_value, clip_value]``.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "device_mesh")]
    if not clip_value or not sharded or len(sharded) == len(grads):
        return False
    if algorithm == "value":
        for grad in grads:
            grad.clamp_(-clip_value, clip_value)
        return True
    whole = [g for g in grads if not hasattr(g, "device_mesh")]
    sharded_norm = torch.nn.utils.get_total_norm(sharded).full_tensor()
    total = torch.stack([sharded_norm, torch.nn.utils.get_total_norm(whole).to(sharded_norm)]).norm()
    scale = float((clip_value / (total + 1e-6)).clamp(max=1.0))
    for grad in grads:
        grad.mul_(scale)
    return True


class ClipsMixedGradients:
    """LightningModule mixin (listed before ``LightningModule``): ``configure_gradient_clipping`` clips through
    :func:`clip_mixed_gradients` when sharded and whole parameters train together, and leaves the rest to
    Lightning."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        if not clip_mixed_gradients(self, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole on the CPU: gathered from every rank for a DTensor (then every rank must call it)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu()


def like_shards_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param``: split like a DTensor ``param`` (this rank keeps its own shard; every rank must
    call it), as is otherwise; in ``param``'s dtype and on its device."""
    full = full.to(dtype=param.dtype)
    if not hasattr(param, "device_mesh"):
        return full.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict on the CPU, gathered in full when FSDP2 shards it (then every rank must call it)."""
    if not any(is_sharded(m) for m in module.modules()):
        return {name: value.detach().cpu() for name, value in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = ["ClipsMixedGradients", "average_gradients", "call_as_forward", "clip_mixed_gradients",
           "data_parallel_mesh", "full_state_dict", "full_tensor", "is_sharded", "like_shards_of", "local_shard",
           "mixed_precision", "resharded", "shard_causal_lm", "shard_modules", "shards_with_fsdp2", "warn_if_fsdp1"]
