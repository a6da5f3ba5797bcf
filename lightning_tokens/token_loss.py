"""How callbacks reshape the per-token training loss of a Hugging Face causal LM.

No Lightning hook can replace the loss a ``training_step`` returns, yet a token-level method must change
it. So the callbacks act one level lower, on the transformers model itself: a single
:class:`TokenLossDispatcher` per model sits on its forward as a pair of hooks. When the model is training
and is called with ``labels``, the pre-hook takes the labels away (the model computes no loss of its
own) and keeps the output head from projecting any position (:mod:`lightning_tokens.lean_loss`); the
forward hook builds a :class:`TokenLossContext` from the final hidden state, whose per-token cross-entropy
covers target positions only and never needs the ``(B, T, V)`` logits. Each attached handler, in
attachment order (the Trainer's callback order), may reweight tokens or add loss terms; the dispatcher
then writes the resulting loss into the model's output, where the user's ``training_step`` reads
``outputs.loss`` as usual.

The loss is the weighted mean ``sum(weights * token_loss) / sum(weights)`` over target tokens plus the
added terms, plus the terms the model's own forward adds to its loss beside the cross-entropy (the router
load-balancing loss of mixture-of-experts models, see :func:`model_loss_terms`). With the initial weights (1 on
every target) it is exactly the loss transformers computes. A model's first dispatched forward also has the model
compute its own loss on one probe target (:func:`check_loss_terms`): a term it adds that is not reproduced raises
:class:`UnsupportedLoss` instead of being dropped.
Evaluation forwards (model in eval mode) and forwards without labels pass through untouched, so
validation losses of runs with and without callbacks compare on the same metric.
"""

from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_tokens.checks import check_numbers
from lightning_tokens.data.packing import (
    PackingError,
    batch_is_packed,
    check_packed_forward,
    flash_attention_kwargs,
    is_packed,
    real_tokens,
    restarts_between_real_tokens,
    runs_flash_attention,
    segment_ids,
)
from lightning_tokens.lean_loss import (
    DEFAULT_CHUNK,
    IGNORE_INDEX,
    HeadInputCapture,
    OutputProjection,
    UnsupportedLogits,
    chunked_cross_entropy,
    is_checked,
    shifted_targets,
    token_cross_entropy,
)
from lightning_tokens.modeling import causal_lm_of, find_causal_lm
from lightning_tokens.quantization import keep_4bit_weights_unpacked
from lightning_tokens.sharding import warn_if_fsdp1

#: Checkpoint entry naming the submodules a callback attached to the LightningModule (CAFT's heads, say).
#: ``CausalLMModule`` leaves their weights out when it is loaded without that callback.
ATTACHED_MODULES_KEY = "lightning_tokens_attached_modules"


class LogitsNotKept(RuntimeError):
    """Full logits were read from a training forward whose loss was computed without them."""


def logits_not_kept_message(what: str) -> str:
    return (f"{what} is not computed in training forwards whose loss lightning-tokens computes: the loss comes from "
            "the final hidden state, a chunk of target positions at a time, and the (batch, length, vocabulary) "
            "logits are never built. Pass keep_logits=True (to CausalLMModule, to the callback, e.g. "
            "TokenSelection(keep_logits=True), or to a handler added to TokenLossDispatcher) to have them; a handler "
            "gets the logits of the positions it needs from ctx.logits_at(mask)")


class TokenLossContext:
    """Everything a handler sees of one training forward. Shapes: B batch, T length, D hidden, V vocabulary.

    Position ``t`` of the per-token tensors (length ``T - 1``) is the prediction made at input position
    ``t`` of the token at input position ``t + 1``.

    The full ``(B, T, V)`` logits are not built (see :mod:`lightning_tokens.lean_loss`): ``token_loss`` is
    computed from ``hidden`` for the target positions only, when a handler first reads it, and
    :meth:`logits_at` gives the logits of the positions a handler asks for. Reading :attr:`logits` raises
    :class:`LogitsNotKept` unless a handler (or ``CausalLMModule``) asked for ``keep_logits=True``.

    Attributes:
        model: The transformers causal LM that ran.
        input_ids: ``(B, T)`` input ids, or ``None`` when the model was called with embeddings.
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding (for a packed batch, derived from its
            ``position_ids``: see :func:`~lightning_tokens.data.packing.real_tokens`).
        labels: ``(B, T)`` labels as given to the model (unshifted, ``-100`` where not a target).
        hidden: ``(B, T, D)`` final hidden state (the output head's input), part of the autograd graph; ``None``
            when the full logits are kept.
        target_mask: ``(B, T - 1)`` whether position ``t`` predicts a target token.
        weights: ``(B, T - 1)`` float32 weight of each prediction in the loss; starts as ``target_mask``.
            Handlers change it in place or replace it.
        extra_losses: Named scalar terms added to the loss (auxiliary heads, ...).
        model_terms: Named scalar terms the model's own forward adds to its loss beside the cross-entropy, as it
            adds them (``{"router": router_aux_loss_coef * aux_loss}`` for a mixture-of-experts model run with
            ``output_router_logits``; see :func:`model_loss_terms`); added to the loss whatever the weights.
        captured: Inputs of submodules captured during this forward, by the key given to
            :meth:`TokenLossDispatcher.capture_inputs`: ``(args, kwargs)`` of the call.
        call_kwargs: The keyword arguments the model was called with (labels removed).
        chunk_size: Target rows projected onto the vocabulary at once.
        keep_logits: Whether the full logits were kept (so extra forwards may build theirs too).
        segments: ``(B, T)`` sample number of each token within its row when the batch is packed (several
            samples per row, see :mod:`lightning_tokens.data.packing`), else ``None``. Whatever a handler
            computes per sample it groups by this, not by row.
    """

    def __init__(self, model: nn.Module, input_ids: Optional[Tensor], attention_mask: Tensor, labels: Tensor,
                 hidden: Optional[Tensor] = None, logits: Optional[Tensor] = None,
                 projection: Optional[OutputProjection] = None, captured: Optional[dict] = None,
                 call_kwargs: Optional[dict[str, Any]] = None, chunk_size: int = DEFAULT_CHUNK,
                 segments: Optional[Tensor] = None, model_terms: Optional[dict[str, Tensor]] = None) -> None:
        check_numbers("TokenLossContext", chunk_size=(chunk_size, "an integer >= 1"))
        if (hidden is None) == (logits is None):
            raise ValueError("TokenLossContext needs exactly one of hidden and logits")
        self.model, self.input_ids, self.attention_mask, self.labels = model, input_ids, attention_mask, labels
        self.hidden, self._logits = hidden, logits
        self.projection = projection if projection is not None or logits is not None else OutputProjection(model)
        self.target_mask = shifted_targets(labels)[1]
        self.weights = self.target_mask.float()
        self.extra_losses: dict[str, Tensor] = {}
        self.model_terms: dict[str, Tensor] = dict(model_terms or {})
        self.captured = captured if captured is not None else {}
        self.call_kwargs = call_kwargs if call_kwargs is not None else {}
        self.chunk_size = chunk_size
        self.segments = segments
        self._token_loss: Optional[Tensor] = None

    @property
    def packed(self) -> bool:
        """Whether rows hold several samples (``segments`` is set)."""
        return self.segments is not None

    @property
    def target_segments(self) -> Optional[Tensor]:
        """``(B, T - 1)`` sample number of the token each prediction targets (packed batches), else ``None``."""
        return None if self.segments is None else self.segments[:, 1:]

    @property
    def keep_logits(self) -> bool:
        return self._logits is not None

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def logits(self) -> Tensor:
        """``(B, T, V)`` output logits, only with ``keep_logits=True``; otherwise raises :class:`LogitsNotKept`."""
        if self._logits is None:
            raise LogitsNotKept(logits_not_kept_message("ctx.logits"))
        return self._logits

    def logits_at(self, positions: Tensor) -> Tensor:
        """Float32 logits ``(N, V)`` of the ``N`` positions where the ``(B, T)`` bool ``positions`` is true, in the
        graph; row order is that of ``hidden[positions]``. Ask for few: each row is ``V`` floats."""
        if self._logits is not None:
            return self._logits[positions].float()
        return self.projection(self.hidden[positions])

    @property
    def token_loss(self) -> Tensor:
        """``(B, T - 1)`` float32 cross-entropy of each prediction, 0 where not a target; in the graph.

        Computed on first read (a chunked projection of the target rows); a handler may replace it.
        """
        if self._token_loss is None:
            if self._logits is not None:
                self._token_loss = per_token_loss(self._logits, self.labels)[0]
            else:
                self._token_loss = token_cross_entropy(self.projection, self.hidden, self.labels, self.chunk_size)[0]
        return self._token_loss

    @token_loss.setter
    def token_loss(self, value: Tensor) -> None:
        self._token_loss = value

    @property
    def context_mask(self) -> Tensor:
        """``(B, T)`` positions that are context: real tokens that are not targets (prompt, turns, bos)."""
        return self.attention_mask.bool() & (self.labels == IGNORE_INDEX)

    def loss(self) -> Tensor:
        """The training loss: weighted mean token loss plus every extra term and every model term.

        When no handler read ``token_loss`` and the weights are constants, the weighted mean is computed in
        one fused pass over the rows of non-zero weight, every gradient finished in forward.
        """
        denominator = self.weights.sum().clamp_min(1e-12)
        if self._token_loss is None and self._logits is None and not self.weights.requires_grad:
            targets, _ = shifted_targets(self.labels)
            rows = self.target_mask & (self.weights != 0)
            scale = self.weights[rows] / denominator
            total, _ = chunked_cross_entropy(self.projection, self.hidden[:, :-1][rows], targets[rows],
                                             self.chunk_size, scale=scale)
        else:
            total = (self.token_loss * self.weights).sum() / denominator
        for term in self.extra_losses.values():
            total = total + term
        for term in self.model_terms.values():
            total = total + term.to(total.device)
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


class UnsupportedLoss(ValueError):
    """A model's forward adds to its training loss something the dispatcher does not reproduce."""


#: Causal LMs whose own loss was compared with the cross-entropy plus their :func:`model_loss_terms`.
_terms_checked: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def router_aux_coefficient(model: nn.Module) -> float:
    """The coefficient a mixture-of-experts causal LM multiplies its router ``aux_loss`` by in its own loss.

    Read where the model's forward reads it: the model's ``router_aux_loss_coef`` attribute (Mixtral, Qwen2/3-MoE,
    OLMoE, Jamba, DBRX, ...; JetMoE's ``aux_loss_coef``), else its text config's ``router_aux_loss_coef``.

    Raises:
        UnsupportedLoss: Neither is set.
    """
    lm = causal_lm_of(model)
    for name in ("router_aux_loss_coef", "aux_loss_coef"):
        if isinstance(getattr(lm, name, None), (int, float)):
            return float(getattr(lm, name))
    coefficient = getattr(lm.config.get_text_config(), "router_aux_loss_coef", None)
    if coefficient is None:
        raise UnsupportedLoss(f"{type(lm).__name__} returns an aux_loss but has no router_aux_loss_coef (model "
                              "attribute or config) saying how much of it its own loss adds, so lightning-tokens "
                              "cannot add it")
    return float(coefficient)


def model_loss_terms(model: nn.Module, output: Any) -> dict[str, Tensor]:
    """The terms a causal LM's forward adds to its loss beside the cross-entropy, exactly as it adds them.

    A mixture-of-experts model run with ``output_router_logits`` (config or call) returns its router
    load-balancing loss as ``output.aux_loss``, computed on the positions of the call's attention mask (every
    position when there is none, as in a packed batch), and given labels adds ``router_aux_loss_coef * aux_loss``
    to its loss: that is ``{"router": coefficient * aux_loss}`` here, in the graph. Without router logits the
    model returns no ``aux_loss`` and there is no term.

    Args:
        model: The causal LM (a PEFT wrapper is looked through).
        output: Its output (a transformers ``ModelOutput``).

    Raises:
        UnsupportedLoss: The output holds another loss (a field named ``*loss*`` besides ``loss`` and ``aux_loss``),
            which the model may add to its own loss and lightning-tokens would drop; the message names it.
    """
    terms: dict[str, Tensor] = {}
    for name in list(output.keys()):
        value = output[name]
        if name == "loss" or "loss" not in name or value is None:
            continue
        if name != "aux_loss":
            raise UnsupportedLoss(
                f"{type(causal_lm_of(model)).__name__} returns a loss term {name!r} that lightning-tokens does not add "
                f"to the training loss it computes (it adds the router aux_loss only): training through it would "
                f"silently drop {name!r}; train this model without lightning-tokens' callbacks and CausalLMModule")
        if torch.is_tensor(value):
            terms["router"] = router_aux_coefficient(model) * value
        elif value != 0:  # transformers' load_balancing_loss_func returns a plain 0 when there are no router logits
            raise UnsupportedLoss(f"{type(causal_lm_of(model)).__name__} returned aux_loss={value!r}, not a tensor")
    return terms


def router_loss(model: nn.Module, router_logits: Optional[tuple[Tensor, ...]],
                attention_mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """``router_aux_loss_coef * aux_loss`` of router logits a method collected from the model's decoder itself.

    The load-balancing loss comes from the model family's own ``load_balancing_loss_func`` with the model's
    ``num_experts`` and ``num_experts_per_tok``, as its causal LM forward computes it.

    Args:
        model: The causal LM (a PEFT wrapper is looked through).
        router_logits: Per MoE layer ``(B * T, experts)`` router logits (the decoder output's ``router_logits``), or
            ``None``.
        attention_mask: ``(B, T)`` the mask the forward was given, or ``None`` (every position counts, as in a packed
            batch). Default ``None``.

    Returns:
        The term, in the graph, or ``None`` without router logits.

    Raises:
        UnsupportedLoss: The model's family has no ``load_balancing_loss_func`` taking these arguments.
    """
    if not router_logits:
        return None
    lm = causal_lm_of(model)
    balance = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
    experts, top_k = getattr(lm, "num_experts", None), getattr(lm, "num_experts_per_tok", None)
    if balance is None or not isinstance(experts, int) or not isinstance(top_k, int):
        raise UnsupportedLoss(f"{type(lm).__name__} returns router logits, but lightning-tokens does not know how its "
                              "forward turns them into a load-balancing loss (no load_balancing_loss_func, num_experts "
                              "and num_experts_per_tok); set output_router_logits to false in its config")
    return router_aux_coefficient(lm) * balance(tuple(router_logits), experts, top_k, attention_mask)


def probe_labels(labels: Tensor, width: int) -> Tensor:
    """``(B, width)`` labels whose only target is token 0 at the last position: the model's own loss on them is the
    cross-entropy of its logits at position ``width - 2`` against 0, plus whatever its forward adds."""
    probe = labels.new_full((labels.shape[0], width), IGNORE_INDEX)
    probe[:, -1] = 0
    return probe


def check_loss_terms(model: nn.Module, output: Any, terms: dict[str, Tensor], call_kwargs: dict[str, Any]) -> None:
    """Compare the loss a model computed itself on :func:`probe_labels` with the cross-entropy plus ``terms``.

    Whatever a model adds to its loss, it adds with the labels it is given, so one forward with the probe labels
    shows the whole sum at the cost of one projected position: its ``loss`` minus the cross-entropy of
    ``output.logits[:, -2]`` against token 0 must be the terms :func:`model_loss_terms` found. A difference is a
    term no output field names (or a loss other than the mean cross-entropy), which the dispatcher would drop.

    Raises:
        UnsupportedLoss: They differ by more than rounding.
    """
    own = output.get("loss")
    if own is None:  # the model computes no loss even with labels: there is nothing to drop
        return
    with torch.no_grad():
        logits = output.logits[:, -2].float()
        cross_entropy = F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long), reduction="sum")
        items = call_kwargs.get("num_items_in_batch")  # transformers then divides the sum by it, not by the count
        cross_entropy = cross_entropy / (items if items is not None else logits.shape[0])
        expected = cross_entropy + sum(term.detach().float().to(logits.device) for term in terms.values())
        gap = (own.detach().float().to(logits.device) - expected).abs().item()
        tolerance = 1e-5 * (1.0 + expected.abs().item())
    if gap > tolerance:
        known = f" plus {', '.join(terms)} ({', '.join(f'{v.item():.4g}' for v in terms.values())})" if terms else ""
        raise UnsupportedLoss(
            f"{type(causal_lm_of(model)).__name__}'s own loss differs by {gap:.3g} from the next-token cross-entropy"
            f"{known}: its forward adds a term no output field names, or computes its loss otherwise, and "
            "lightning-tokens, which computes the training loss itself, would silently drop it; train this model "
            "without lightning-tokens' callbacks and CausalLMModule")


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
        #: Forwards of the model so far: ``dispatched`` (training mode, with labels: handlers ran), and those
        #: passed through untouched for being in ``eval_mode`` or having ``no_labels``.
        self.counts = {"dispatched": 0, "eval_mode": 0, "no_labels": 0}
        #: Target rows projected onto the vocabulary at once.
        self.chunk_size = DEFAULT_CHUNK
        self._capture: Optional[HeadInputCapture] = None
        self._checking = False
        self._checking_terms = False
        #: Set by callbacks for a training batch that is packed: its forwards must then carry its position ids.
        self.expect_packed = False
        self._segments: Optional[Tensor] = None

    @property
    def keep_logits(self) -> bool:
        """Whether training forwards build their full logits: when any handler has ``keep_logits = True``."""
        return any(getattr(handler, "keep_logits", False) for handler in self.handlers)

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
        """Attach ``handler``; handlers run in the order they were added.

        A handler with a true ``keep_logits`` attribute makes training forwards build their full logits again
        (``outputs.logits``, ``ctx.logits``), at the memory cost of plain transformers.
        """
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
        if module is not self.model or self._busy:
            return None
        if not module.training or kwargs.get("labels") is None:
            self.counts["eval_mode" if not module.training else "no_labels"] += 1
            return None
        self.counts["dispatched"] += 1
        kwargs = dict(kwargs)
        self._segments = self._packing(kwargs)
        self._labels = kwargs.pop("labels")
        self._captured = {}
        self._active = True
        # The first forward of a model also computes the model's own loss on one target (check_loss_terms).
        self._checking_terms = module not in _terms_checked and self._labels.shape[-1] >= 2
        if not self.keep_logits:
            if self._capture is None:
                self._capture = HeadInputCapture(module)
            # The first lean forward of a model also projects its last position (two while its loss terms are
            # checked), to check the reproduction.
            self._checking = not is_checked(module)
            self._capture.start(keep_last=2 if self._checking_terms else int(self._checking))
        if self._checking_terms:
            kwargs["labels"] = probe_labels(self._labels, self._labels.shape[-1] if self.keep_logits else 2)
        return args, kwargs

    def _packing(self, kwargs: dict) -> Optional[Tensor]:
        """The sample numbers of a packed forward (``kwargs`` set to use no cache), else ``None``.

        Raises :class:`PackingError` where transformers would let a packed row's samples attend to each other.
        """
        position_ids, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and position_ids is not None and position_ids.shape == mask.shape:
            if restarts_between_real_tokens(position_ids, mask):
                raise PackingError(
                    "the model was called with packed position_ids (several samples per row) and a 2D attention_mask: "
                    "transformers then ignores the sample boundaries; pass position_ids without attention_mask")
        if mask is not None or not is_packed(position_ids):
            if self.expect_packed:
                raise PackingError(
                    "this training batch is packed (several samples per row) but the model was called without its "
                    "position_ids, so every token would attend to the earlier samples of its row: call the model "
                    "with the batch's position_ids and no attention_mask, e.g. model(**batch)")
            return None
        kwargs["use_cache"] = False  # a cache also turns transformers' packed-sequence detection off
        if runs_flash_attention(self.model) and kwargs.get("cu_seq_lens_q") is None:
            # flash attention finds packed rows from position ids only in a batch of one row
            kwargs.update(flash_attention_kwargs(position_ids))
        return segment_ids(position_ids)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if module is not self.model or not self._active:
            return None
        self._active = False
        labels, self._labels = self._labels, None
        segments, self._segments = self._segments, None
        kwargs = {key: value for key, value in kwargs.items() if key != "labels"}  # the probe's, if any
        model_terms = model_loss_terms(module, output)
        if self._checking_terms:
            check_loss_terms(module, output, model_terms, kwargs)
            _terms_checked.add(module)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        if segments is not None:
            segments = segments.expand(labels.shape[0], -1)  # position ids may come as (1, T)
            attention_mask = real_tokens(segments).long()
        elif attention_mask is None:
            attention_mask = torch.ones_like(labels)
        common = dict(model=module, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      captured=self._captured, call_kwargs=kwargs, chunk_size=self.chunk_size, segments=segments,
                      model_terms=model_terms)
        if self._capture is not None and self._capture.active:
            hidden = self._capture.stop()
            if hidden is None or hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
                raise UnsupportedLogits(
                    f"{type(module).__name__}'s output head did not receive the (batch, length, hidden) final hidden "
                    "state the lean loss reads; pass keep_logits=True to compute the loss from the full logits")
            projection = OutputProjection(module)
            if self._checking:
                projection.check(hidden[:, -output.logits.shape[1]:], output.logits)
            ctx = TokenLossContext(hidden=hidden, projection=projection, **common)
        else:
            ctx = TokenLossContext(logits=output.logits, **common)
        self._captured = {}
        self._busy = True
        try:
            check_packed_forward(module, input_ids, kwargs)  # once per model: its own forwards pass untouched
            for handler in self.handlers:
                handler.reshape_token_loss(ctx)
        finally:
            self._busy = False
        output.loss = ctx.loss()
        output.move_to_end("loss", last=False)  # outputs[0] is the loss, as when transformers computes it
        return output if ctx.keep_logits else without_logits(output)


#: Subclasses of transformers output classes whose ``logits`` attribute raises :class:`LogitsNotKept`.
_LEAN_OUTPUTS: dict[type, type] = {}


def _no_logits(self: Any) -> Tensor:
    raise LogitsNotKept(logits_not_kept_message("outputs.logits"))


def _set_logits(self: Any, value: Any) -> None:
    if value is not None:
        raise LogitsNotKept(logits_not_kept_message("outputs.logits"))


def without_logits(output: Any) -> Any:
    """``output`` (a transformers ``ModelOutput``) made to raise :class:`LogitsNotKept` when its logits are read."""
    cls = type(output)
    lean = _LEAN_OUTPUTS.get(cls)
    if lean is None:
        # Without ``logits`` among its dataclass fields, code that walks an output's fields (FSDP2's post-forward
        # hook, tree utilities) skips it instead of reading it.
        fields = {name: f for name, f in getattr(cls, "__dataclass_fields__", {}).items() if name != "logits"}
        lean = type(cls.__name__, (cls,), {"logits": property(_no_logits, _set_logits), "__module__": cls.__module__,
                                            "__doc__": cls.__doc__, "__dataclass_fields__": fields})
        _LEAN_OUTPUTS[cls] = lean
    if "logits" in output.keys():
        # ModelOutput forbids __delitem__; the key must not linger in to_tuple().
        OrderedDict.__delitem__(output, "logits")
    output.__dict__.pop("logits", None)
    output.__class__ = lean
    return output


class PlainLoss:
    """A handler that changes nothing: attached, it gives a model's training forwards the lean loss alone.

    ``CausalLMModule`` attaches one for plain SFT; a loop of your own does the same with
    ``TokenLossDispatcher.for_model(model).add(PlainLoss())``.

    Args:
        keep_logits: Build the full logits too (``outputs.logits``). Default ``False``.
    """

    def __init__(self, keep_logits: bool = False) -> None:
        self.keep_logits = keep_logits

    def reshape_token_loss(self, ctx: TokenLossContext) -> None:
        pass


class TokenLossCallback(Callback):
    """Base class of callbacks that reshape the per-token training loss of a causal LM.

    Subclasses implement :meth:`reshape_token_loss`; those that override the ``on_train_batch_start`` /
    ``on_train_batch_end`` hooks call ``super()``. On ``setup`` the callback joins the dispatcher of the causal
    LM found in the LightningModule; on ``teardown`` it leaves. If no forward of that model is dispatched in
    the first training batch (the model in eval mode, called without ``labels``, or not called at all), the
    callback warns once, saying which.

    Args:
        model_attribute: Dotted attribute path of the causal LM inside the LightningModule. Default
            ``None``: found automatically (see :func:`find_causal_lm`: the only causal LM, or the only
            trainable one among several).
        keep_logits: Build the full ``(B, T, V)`` logits in training forwards, for a ``training_step`` that
            reads ``outputs.logits``. Default ``False``: the loss is computed from the final hidden state in
            chunks of target positions, and reading ``outputs.logits`` raises :class:`LogitsNotKept`.
    """

    def __init__(self, model_attribute: Optional[str] = None, keep_logits: bool = False) -> None:
        self.model_attribute = model_attribute
        self.keep_logits = bool(keep_logits)
        self.dispatcher: Optional[TokenLossDispatcher] = None
        self._first_batch_counts: Optional[dict[str, int]] = None
        self._checked_first_batch = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        warn_if_fsdp1(trainer, type(self).__name__)
        self.dispatcher = TokenLossDispatcher.for_model(find_causal_lm(pl_module, self.model_attribute))
        self.dispatcher.add(self)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.remove(self)
            self.dispatcher = None

    # A callback that never acts must not go unnoticed: the first training batch is watched, and if no forward
    # of the model was dispatched in it, one warning says what the callback needs and what it saw.
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.dispatcher is not None:
            self.dispatcher.expect_packed = batch_is_packed(batch)
        if not self._checked_first_batch and self.dispatcher is not None:
            self._first_batch_counts = dict(self.dispatcher.counts)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.dispatcher is not None:
            self.dispatcher.expect_packed = False
        if self._checked_first_batch or self._first_batch_counts is None or self.dispatcher is None:
            return
        self._checked_first_batch = True
        seen = {key: value - self._first_batch_counts[key] for key, value in self.dispatcher.counts.items()}
        if seen["dispatched"] == 0:
            rank_zero_warn(inert_message(type(self).__name__, type(self.dispatcher.model).__name__, seen))

    def reshape_token_loss(self, ctx: TokenLossContext) -> None:
        """Change ``ctx.weights`` or add to ``ctx.extra_losses`` for one training forward."""
        raise NotImplementedError


def inert_message(callback: str, model: str, seen: dict[str, int]) -> str:
    """The warning of a callback whose first training batch dispatched no forward of its model."""
    if seen["eval_mode"]:
        why = (f"{seen['eval_mode']} forward(s) of it ran in eval mode: call model.train() in your module "
               "(from_pretrained returns a model in eval mode, and Lightning keeps a submodule's mode)")
    elif seen["no_labels"]:
        why = (f"{seen['no_labels']} forward(s) of it had no labels: call it with labels=... and return "
               "outputs.loss (a loss computed from outputs.logits cannot be reshaped)")
    else:
        why = ("no forward of it ran in the batch: is it the model your training_step calls? Name that one "
               "with model_attribute")
    return (f"{callback} did nothing in the first training batch. It reshapes the loss of {model} forwards run "
            f"in training mode with labels, and {why}.")
