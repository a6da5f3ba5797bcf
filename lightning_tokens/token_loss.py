"""How callbacks reshape the per-token training loss of a Hugging Face causal LM.

No Lightning hook can replace the loss a ``training_step`` returns, yet a token-level method must change
it. So the callbacks act one level lower, on the transformers model itself: a single
:class:`TokenLossDispatcher` per model sits on its forward as a pair of hooks. When the model is training
and is called with ``labels``, the pre-hook takes the labels away (the model computes no loss of its
own) and the forward hook builds a :class:`TokenLossContext` from the logits. Each attached handler, in
attachment order (the Trainer's callback order), may reweight tokens or add loss terms; the dispatcher
then writes the resulting loss into the model's output, where the user's ``training_step`` reads
``outputs.loss`` as usual.

The loss is the weighted mean ``sum(weights * token_loss) / sum(weights)`` over target tokens plus the
added terms. With the initial weights (1 on every target) it is exactly the usual next-token loss.
Evaluation forwards (model in eval mode) and forwards without labels pass through untouched, so
validation losses of runs with and without callbacks compare on the same metric.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lightning_tokens.modeling import causal_lm_of
from lightning_tokens.quantization import keep_4bit_weights_unpacked

IGNORE_INDEX = -100
#: Checkpoint entry naming the submodules a callback attached to the LightningModule (CAFT's heads, say).
#: ``CausalLMModule`` leaves their weights out when it is loaded without that callback.
ATTACHED_MODULES_KEY = "lightning_tokens_attached_modules"


@dataclass
class TokenLossContext:
    """Everything a handler sees of one training forward. Shapes: B batch, T length, V vocabulary.

    Position ``t`` of the per-token tensors (length ``T - 1``) is the prediction made at input position
    ``t`` of the token at input position ``t + 1``.

    Attributes:
        model: The transformers causal LM that ran.
        input_ids: ``(B, T)`` input ids, or ``None`` when the model was called with embeddings.
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding.
        labels: ``(B, T)`` labels as given to the model (unshifted, ``-100`` where not a target).
        logits: ``(B, T, V)`` output logits, part of the autograd graph.
        target_mask: ``(B, T - 1)`` whether position ``t`` predicts a target token.
        token_loss: ``(B, T - 1)`` float32 cross-entropy of each prediction, 0 where not a target.
        weights: ``(B, T - 1)`` float32 weight of each prediction in the loss; starts as ``target_mask``.
            Handlers change it in place or replace it.
        extra_losses: Named scalar terms added to the loss (auxiliary heads, ...).
        captured: Inputs of submodules captured during this forward, by the key given to
            :meth:`TokenLossDispatcher.capture_inputs`: ``(args, kwargs)`` of the call.
        call_kwargs: The keyword arguments the model was called with (labels removed).
    """

    model: nn.Module
    input_ids: Optional[Tensor]
    attention_mask: Tensor
    labels: Tensor
    logits: Tensor
    target_mask: Tensor
    token_loss: Tensor
    weights: Tensor
    extra_losses: dict[str, Tensor] = field(default_factory=dict)
    captured: dict[str, tuple[tuple, dict]] = field(default_factory=dict)
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def context_mask(self) -> Tensor:
        """``(B, T)`` positions that are context: real tokens that are not targets (prompt, turns, bos)."""
        return self.attention_mask.bool() & (self.labels == IGNORE_INDEX)

    def loss(self) -> Tensor:
        """The training loss: weighted mean token loss plus every extra term."""
        total = (self.token_loss * self.weights).sum() / self.weights.sum().clamp_min(1e-12)
        for term in self.extra_losses.values():
            total = total + term
        return total


def per_token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy at every position (float32) and the target mask, both ``(B, T - 1)``."""
    # Shifting the labels (not the logits) keeps the logits contiguous: no (B, T, V) copy.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    vocab = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, vocab).float(), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    loss = loss.view_as(shifted)[:, :-1]
    return loss, shifted[:, :-1] != IGNORE_INDEX


class TokenLossDispatcher:
    """The one pair of forward hooks on a causal LM through which handlers reshape its training loss.

    Use :meth:`for_model` to get the model's dispatcher (created on first use); :meth:`add` a handler
    (anything with ``reshape_token_loss(ctx)``) and :meth:`remove` it. The hooks go away with the last
    handler. Forwards started while handlers run (a history model, say) pass through untouched.

    The hooks are plain closures over a weak reference, so a ``copy.deepcopy`` of the model (a frozen
    history copy) carries hooks that ignore it, instead of a copy of the dispatcher.
    """

    _registry: "weakref.WeakKeyDictionary[nn.Module, TokenLossDispatcher]" = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module) -> None:
        self._model_ref = weakref.ref(model)
        self.handlers: list[Any] = []
        self._hooks: list[Any] = []
        self._capture_hooks: dict[str, Any] = {}
        self._labels: Optional[Tensor] = None
        self._captured: dict[str, tuple[tuple, dict]] = {}
        self._active = False
        self._busy = False

    @classmethod
    def for_model(cls, model: nn.Module) -> "TokenLossDispatcher":
        """The dispatcher of ``model`` (the transformers model, found inside wrappers).

        A new dispatcher also keeps the model's 4-bit layers off bitsandbytes' CPU repacking path (see
        :func:`~lightning_tokens.quantization.keep_4bit_weights_unpacked`): a model the user loaded would
        otherwise stop passing gradients through its base weights after its first validation forward.
        """
        model = causal_lm_of(model)
        if model not in cls._registry:
            keep_4bit_weights_unpacked(model)
            cls._registry[model] = cls(model)
        return cls._registry[model]

    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model of this dispatcher no longer exists")
        return model

    @property
    def busy(self) -> bool:
        """Whether handlers are running now (their own forwards are not dispatched)."""
        return self._busy

    def add(self, handler: Any) -> None:
        """Attach ``handler``; handlers run in the order they were added."""
        if handler in self.handlers:
            return
        if not self._hooks:
            self._install()
        self.handlers.append(handler)

    def remove(self, handler: Any) -> None:
        """Detach ``handler``; the hooks are removed with the last one."""
        if handler in self.handlers:
            self.handlers.remove(handler)
        if not self.handlers:
            for hook in [*self._hooks, *self._capture_hooks.values()]:
                hook.remove()
            self._hooks, self._capture_hooks = [], {}
            self._registry.pop(self.model, None)

    def capture_inputs(self, module: nn.Module, key: str) -> None:
        """Record the ``(args, kwargs)`` of ``module``'s calls during dispatched forwards as ``ctx.captured[key]``.

        Only the first call per forward is kept; recomputation in backward (gradient checkpointing) and
        forwards outside dispatch record nothing.
        """
        if key in self._capture_hooks:
            return
        ref = weakref.ref(self)

        def capture(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            dispatcher = ref()
            if dispatcher is not None and dispatcher._active and key not in dispatcher._captured:
                dispatcher._captured[key] = (args, kwargs)

        self._capture_hooks[key] = module.register_forward_pre_hook(capture, with_kwargs=True)

    def _install(self) -> None:
        ref = weakref.ref(self)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            dispatcher = ref()
            return None if dispatcher is None else dispatcher._before(module, args, kwargs)

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            dispatcher = ref()
            return None if dispatcher is None else dispatcher._after(module, args, kwargs, output)

        model = self.model
        self._hooks = [
            model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.register_forward_hook(post_hook, with_kwargs=True),
        ]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        if module is not self.model or self._busy or not module.training or kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        self._labels = kwargs.pop("labels")
        self._captured = {}
        self._active = True
        return args, kwargs

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if module is not self.model or not self._active:
            return None
        self._active = False
        labels, self._labels = self._labels, None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(labels)
        token_loss, target_mask = per_token_loss(output.logits, labels)
        ctx = TokenLossContext(
            model=module, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
            logits=output.logits, target_mask=target_mask, token_loss=token_loss,
            weights=target_mask.float(), captured=self._captured, call_kwargs=kwargs,
        )
        self._captured = {}
        self._busy = True
        try:
            for handler in self.handlers:
                handler.reshape_token_loss(ctx)
        finally:
            self._busy = False
        output.loss = ctx.loss()
        return output


def find_causal_lm(pl_module: LightningModule, attribute: Optional[str] = None) -> nn.Module:
    """The transformers causal LM a LightningModule trains.

    Args:
        pl_module: The LightningModule.
        attribute: Dotted attribute path to the model inside ``pl_module`` (``"model"``, ``"net.lm"``).
            Default ``None``: the first Hugging Face causal LM among ``pl_module``'s submodules.
    """
    if attribute is None:
        return causal_lm_of(pl_module)
    target: Any = pl_module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AttributeError(f"{type(pl_module).__name__} has no attribute path {attribute!r} (at {part!r})")
        target = getattr(target, part)
    return causal_lm_of(target)


class TokenLossCallback(Callback):
    """Base class of callbacks that reshape the per-token training loss of a causal LM.

    Subclasses implement :meth:`reshape_token_loss`. On ``setup`` the callback joins the dispatcher of
    the causal LM found in the LightningModule; on ``teardown`` it leaves.

    Args:
        model_attribute: Dotted attribute path of the causal LM inside the LightningModule. Default
            ``None``: found automatically (the first Hugging Face causal LM among its submodules).
    """

    def __init__(self, model_attribute: Optional[str] = None) -> None:
        self.model_attribute = model_attribute
        self.dispatcher: Optional[TokenLossDispatcher] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.dispatcher = TokenLossDispatcher.for_model(find_causal_lm(pl_module, self.model_attribute))
        self.dispatcher.add(self)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.remove(self)
            self.dispatcher = None

    def reshape_token_loss(self, ctx: TokenLossContext) -> None:
        """Change ``ctx.weights`` or add to ``ctx.extra_losses`` for one training forward."""
        raise NotImplementedError
