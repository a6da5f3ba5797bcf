"""Where the history loss ``L_his`` (or Rho-1's reference loss) of each response token comes from.

Every source answers ``token_loss(ctx) -> (B, T - 1)`` float32 cross-entropy, 0 off the targets, computed
without gradients:

- :class:`DisabledAdapters`: LoRA/QLoRA; the same model with its adapters switched off (no copy).
- :class:`FrozenCopy`: full fine-tuning; a frozen copy of the initial weights, optionally 8-bit or 4-bit.
- :class:`EmaWeights`: an exponential moving average of the trainable weights, swapped in for one forward.
- :class:`Precomputed`: a per-token loss file written by ``lightning-tokens score`` (see :mod:`.loss_table`).
- :class:`ReferenceModel`: another model (Rho-1's reference model).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lightning_tokens.lean_loss import DEFAULT_CHUNK, lean_token_loss
from lightning_tokens.modeling import ModelSpec, causal_lm_of, inference_kwargs, load_frozen_causal_lm, peft_model_of
from lightning_tokens.quantization import bnb_config, from_pretrained_quantized
from lightning_tokens.sharding import full_tensor, is_sharded, like_shards_of, local_shard, resharded
from lightning_tokens.sstoken.loss_table import LossTable
from lightning_tokens.token_loss import TokenLossContext, per_token_loss

#: Keyword arguments of a causal LM call that a history forward passes on (labels never).
FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def forward_kwargs(ctx: TokenLossContext) -> dict[str, Any]:
    """The inputs of the training forward, for a history forward of the same batch."""
    kwargs = {key: ctx.call_kwargs[key] for key in FORWARD_KEYS if ctx.call_kwargs.get(key) is not None}
    if "input_ids" not in kwargs and "inputs_embeds" not in kwargs and ctx.input_ids is not None:
        kwargs["input_ids"] = ctx.input_ids
    if not ctx.packed:  # a packed batch's boundaries are in its position ids; a 2D mask would hide them
        kwargs.setdefault("attention_mask", ctx.attention_mask)
    return kwargs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Within: ``model`` in eval mode (no dropout); every submodule's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class TokenNll:
    """Per-token cross-entropy ``(B, T - 1)`` of a causal LM on a training batch, without gradients.

    The output head projects target positions only, a chunk at a time (see
    :func:`~lightning_tokens.lean_loss.lean_token_loss`); when the training forward kept its full logits
    (``keep_logits=True``), this forward builds them too.

    Only the cross-entropy is wanted: a mixture-of-experts model runs without ``output_router_logits``, so its
    router load-balancing loss (part of the training loss) is neither computed nor counted here.
    """

    @torch.no_grad()
    def __call__(self, model: nn.Module, kwargs: dict[str, Any], labels: Tensor, chunk_size: int = DEFAULT_CHUNK,
                 keep_logits: bool = False) -> Tensor:
        kwargs = {**kwargs, "use_cache": False, **inference_kwargs(model)}
        if keep_logits:
            return per_token_loss(model(**kwargs).logits, labels)[0]
        return lean_token_loss(model, kwargs, labels, chunk_size)

    def of(self, model: nn.Module, ctx: TokenLossContext) -> Tensor:
        """The loss of ``model`` on the batch of the training forward ``ctx``."""
        return self(model, forward_kwargs(ctx), ctx.labels, ctx.chunk_size, ctx.keep_logits)


class HistorySource:
    """Base of the history sources: ``token_loss`` per batch, optional per-step update and checkpoint state."""

    def setup(self, model: nn.Module, pl_module: Optional[nn.Module], device: torch.device) -> None:
        """Prepare for training ``model`` (the causal LM) inside ``pl_module`` on ``device``."""

    def token_loss(self, ctx: TokenLossContext) -> Tensor:
        raise NotImplementedError

    def on_train_start(self) -> None:
        """Called when training starts, after the model is sharded and any checkpoint restored."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called once after every optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DisabledAdapters(HistorySource):
    """The frozen base of a PEFT model: the training model itself, run with its adapters disabled."""

    def __init__(self) -> None:
        self.peft_model: Optional[nn.Module] = None
        self.nll = TokenNll()

    def setup(self, model: nn.Module, pl_module: Optional[nn.Module], device: torch.device) -> None:
        self.peft_model = peft_model_of(pl_module or model)
        if self.peft_model is None:
            raise ValueError("DisabledAdapters needs a PEFT model")

    def token_loss(self, ctx: TokenLossContext) -> Tensor:
        with self.peft_model.disable_adapter(), eval_mode(ctx.model):
            return self.nll.of(ctx.model, ctx)


def quantized_copy(model: nn.Module, quantization: str, device: torch.device) -> nn.Module:
    """A bitsandbytes 8-bit (``"int8"``) or 4-bit (``"nf4"``, ``"fp4"``) copy of ``model``'s current weights."""
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        place = device.index if device.type == "cuda" else device.type
        return from_pretrained_quantized(tmp, bnb_config(quantization, dtype, double_quant=False),
                                         device_map={"": place}, dtype=dtype)


class FrozenCopy(HistorySource):
    """A frozen copy of the initial weights (full fine-tuning), kept as is or quantized with bitsandbytes.

    Args:
        quantization: ``None`` (same dtype as the model), ``"int8"``, ``"nf4"`` or ``"fp4"``. Default ``None``.
    """

    def __init__(self, quantization: Optional[str] = None) -> None:
        self.quantization = quantization
        self.model: Optional[nn.Module] = None
        self.nll = TokenNll()

    def setup(self, model: nn.Module, pl_module: Optional[nn.Module], device: torch.device) -> None:
        model = causal_lm_of(model)
        if self.quantization is None:
            self.model = copy.deepcopy(model)
        else:
            self.model = quantized_copy(model, self.quantization, device)
        self.model.requires_grad_(False).eval()

    def token_loss(self, ctx: TokenLossContext) -> Tensor:
        if self.quantization is None and self.model.device != ctx.device:
            self.model.to(ctx.device)
        return self.nll.of(self.model, ctx)


class EmaWeights(HistorySource):
    """An exponential moving average of the trainable weights: ``theta_his <- a * theta_his + (1 - a) * theta``.

    Only trainable parameters are averaged (the adapters under LoRA); frozen ones are shared with the model.
    For a history forward the averages are swapped into the modules' parameter slots and swapped back after,
    so the training graph's saved tensors are untouched.

    Under FSDP2 (``ModelParallelStrategy``) each rank averages its own shards: the averages are exchanged with
    the local shards for the history forward (the units gathering them as usual) and exchanged back after, and
    checkpoints hold the averages whole (gathered when saved, split again when loaded). Parameters that sharding
    replaces after :meth:`setup` are followed.

    Args:
        decay: ``a``. Default ``0.99``.
        defer: Start the averages at :meth:`on_train_start` (or when a checkpoint is loaded) instead of at
            :meth:`setup`: for a model sharded between the two, so that no full copy is made. Default ``False``.
    """

    def __init__(self, decay: float = 0.99, defer: bool = False) -> None:
        self.decay = decay
        self.defer = defer
        self.model: Optional[nn.Module] = None
        self.params: list[nn.Parameter] = []
        self.shadow: list[Tensor] = []
        self.slots: list[tuple[nn.Module, str, int]] = []
        self.updates = 0
        self.nll = TokenNll()
        self._update = get_ema_multi_avg_fn(decay)
        self._collected_sharded = False

    def setup(self, model: nn.Module, pl_module: Optional[nn.Module], device: torch.device) -> None:
        self.model = model
        if not self.defer:
            self._follow()

    def on_train_start(self) -> None:
        self._follow()

    def _trainable(self) -> tuple[list[nn.Parameter], list[tuple[nn.Module, str, int]]]:
        """The trainable parameters, and every ``(module, name, index)`` slot holding one (tied weights have
        several)."""
        lm = causal_lm_of(self.model)
        params = list({id(p): p for p in lm.parameters() if p.requires_grad}.values())
        index = {id(p): i for i, p in enumerate(params)}
        slots = [(module, name, index[id(p)]) for module in lm.modules()
                 for name, p in module._parameters.items() if p is not None and id(p) in index]
        return params, slots

    def _follow(self) -> None:
        """Collect the trainable parameters and start the averages from them, once; again once the model is sharded
        (sharding replaces the parameters, before any step)."""
        sharded = self.sharded
        if self.params and sharded == self._collected_sharded:
            return
        if sharded:  # after a forward the root holds gathered copies until the backward: collect the shards
            with resharded(self.model):
                params, slots = self._trainable()
            if not all(hasattr(p, "device_mesh") for p in params):
                raise RuntimeError("EmaWeights: under FSDP2 the averages must start outside a forward; call "
                                   "on_train_start() before training (TokenSelection does)")
        else:
            params, slots = self._trainable()
        self.params, self.slots, self._collected_sharded = params, slots, sharded
        self.shadow = [p.detach().clone() for p in params]

    @property
    def sharded(self) -> bool:
        return any(is_sharded(module) for module in self.model.modules())

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within: the modules hold the averaged weights."""
        if self._collected_sharded:
            with torch.no_grad(), self._sharded_swap():
                yield
            return
        for module, name, i in self.slots:
            module._parameters[name] = self.shadow[i]
        try:
            yield
        finally:
            for module, name, i in self.slots:
                module._parameters[name] = self.params[i]

    @contextlib.contextmanager
    def _sharded_swap(self) -> Iterator[None]:
        """:meth:`swapped` under FSDP2, called within the training forward. A unit holding its shard only (a decoder
        layer, resharded after its forward) gathers the averages if they are in its local shards. A unit still
        gathered (the root, which FSDP2 keeps gathered until the backward) gets the gathered averages in its
        parameter slots instead; its gathered weights, which the training graph saved, stay untouched."""
        exchanged = sorted({i for module, name, i in self.slots if module._parameters[name] is self.params[i]})
        gathered = [(module, name, i) for module, name, i in self.slots
                    if module._parameters[name] is not self.params[i]]
        averages: dict[int, Tensor] = {}
        for module, name, i in gathered:  # every rank takes part in each gather, in the same order
            if i not in averages:
                averages[i] = self.shadow[i].full_tensor().to(module._parameters[name])
        held = [module._parameters[name] for module, name, _ in gathered]
        self._exchange(exchanged)
        for module, name, i in gathered:
            module._parameters[name] = averages[i]
        try:
            yield
        finally:
            for (module, name, _), weight in zip(gathered, held):
                module._parameters[name] = weight
            self._exchange(exchanged)

    def _exchange(self, indices: list[int]) -> None:
        """Swap the contents of the local shards of the given parameters and of their averages."""
        for i in indices:
            mine, theirs = local_shard(self.params[i].detach()), local_shard(self.shadow[i])
            kept = mine.clone()
            mine.copy_(theirs)
            theirs.copy_(kept)

    def token_loss(self, ctx: TokenLossContext) -> Tensor:
        self._follow()
        self._to(ctx.device)
        with self.swapped(), eval_mode(ctx.model):
            return self.nll.of(ctx.model, ctx)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        self._follow()
        self._to(self.params[0].device)
        self._update([local_shard(s) for s in self.shadow], [local_shard(p.detach()) for p in self.params],
                     self.updates)
        self.updates += 1

    def _to(self, device: torch.device) -> None:
        if self.shadow and self.shadow[0].device != device:
            self.shadow = [s.to(device) for s in self.shadow]

    def state_dict(self) -> dict[str, Any]:
        self._follow()
        return {"shadow": [full_tensor(s) for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._follow()
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"TokenSelection: the checkpoint's EMA holds {len(state['shadow'])} tensors, "
                             f"the model has {len(self.shadow)} trainable parameters")
        self.shadow = [like_shards_of(s, p.detach()) for s, p in zip(state["shadow"], self.params)]
        self.updates = int(state["updates"])


class Precomputed(HistorySource):
    """History losses read from a file written by ``lightning-tokens score``, looked up by sample content.

    Args:
        path: The file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.table = None

    def setup(self, model: nn.Module, pl_module: Optional[nn.Module], device: torch.device) -> None:
        self.table = LossTable.load(self.path)

    def check_data(self, samples) -> None:
        """Raise unless every ``(input_ids, labels)`` pair of ``samples`` is in the file with matching targets."""
        self.table.check(samples)

    def token_loss(self, ctx: TokenLossContext) -> Tensor:
        return self.table.lookup(ctx.input_ids, ctx.attention_mask, ctx.labels, ctx.segments).to(ctx.device)


class ReferenceModel(HistorySource):
    """Rho-1's reference model, loaded from a :class:`ModelSpec` and frozen.

    Args:
        spec: The reference model. It must share the training model's tokenizer (vocabulary size is checked).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: Optional[nn.Module] = None
        self.nll = TokenNll()

    def setup(self, model: nn.Module, pl_module: Optional[nn.Module], device: torch.device) -> None:
        reference, _ = load_frozen_causal_lm(self.spec)
        ours, theirs = causal_lm_of(model).config.vocab_size, causal_lm_of(reference).config.vocab_size
        if ours != theirs:
            raise ValueError(f"TokenSelection.reference: its vocabulary has {theirs} tokens, the model's {ours}; "
                             "the reference model must use the same tokenizer")
        self.model = reference.requires_grad_(False).eval()

    def token_loss(self, ctx: TokenLossContext) -> Tensor:
        reference = causal_lm_of(self.model)
        if not getattr(reference, "is_quantized", False) and reference.device != ctx.device:
            self.model.to(ctx.device)
        return self.nll.of(self.model, ctx)
