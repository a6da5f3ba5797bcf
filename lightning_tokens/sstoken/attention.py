"""The semantic-aware signal: how much attention each response token pays to its context, at one layer.

The model keeps its own attention kernel (SDPA, flash) in every layer. After the training forward, the
chosen layer's attention module is called once more on its captured inputs, under ``no_grad`` and in eval
mode, with a probe registered in transformers' ``AttentionInterface`` standing in for the kernel. The
probe receives the module's own query and key states (projections, rotary embeddings, norms and scaling
already applied, so any architecture using the interface works) and stops the module there: no value
product, no output projection. The score is then computed from them with an explicit causal + padding
mask and a float32 softmax (one fused attention call whose values are the context indicator).

A model whose attention skips that interface (its own eager code, as Falcon's and GPT-J's in transformers 5.23 but
not 5.25, or no transformers config at all, as Bloom's and MPT's) is refused before training
(:meth:`AttentionProbe.check`): a forward of two tokens, stopped at the probed module, then the probe on the inputs
it captured.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, Cache

from lightning_tokens.modeling import causal_lm_of, decoder_layers, decoder_of
from lightning_tokens.quantization import keep_4bit_weights_unpacked
from lightning_tokens.sstoken.history import eval_mode

PROBE_NAME = "lightning_tokens_probe"
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
#: Largest number of mask entries (B x query heads of a group x query chunk x T) or, on the soft-capped path,
#: float32 scores (B x heads x query chunk x T) held at once.
MAX_SCORES = 1 << 24


class _Probed(Exception):
    """Carries the query/key states out of the attention module (and skips the rest of its forward)."""

    def __init__(self, query: Tensor, key: Tensor, scaling: Optional[float], softcap: Optional[float]) -> None:
        super().__init__()
        self.query, self.key, self.scaling, self.softcap = query, key, scaling, softcap


class _Captured(Exception):
    """Carries the inputs of the probed attention module out of a model forward (and stops that forward)."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs


def _probe(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
           scaling: Optional[float] = None, softcap: Optional[float] = None, **kwargs) -> tuple[Tensor, None]:
    raise _Probed(query.detach(), key.detach(), scaling, softcap)


AttentionInterface.register(PROBE_NAME, _probe)


def context_attention(query: Tensor, key: Tensor, attention_mask: Tensor, context: Tensor,
                      scaling: Optional[float] = None, softcap: Optional[float] = None,
                      segments: Optional[Tensor] = None) -> Tensor:
    """Head-mean attention mass from each query position to the context positions.

    The mass is an attention output: with the context indicator as the value vectors,
    ``sum_j softmax_j(q_i . k_j) * context[j]`` is what ``scaled_dot_product_attention`` returns, so the scores
    are computed by a fused kernel on float32 inputs (float32 softmax) and no ``(B, H, T, T)`` tensor is made.
    Soft-capped scores (Gemma 2), which that kernel cannot apply, take an explicit chunked softmax instead.

    Args:
        query: ``(B, H, T, D)`` query states.
        key: ``(B, H_kv, T, D)`` key states; ``H`` must be a multiple of ``H_kv`` (grouped-query attention:
            head ``h`` reads key head ``h // (H / H_kv)``, as transformers' ``repeat_kv``).
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding.
        context: ``(B, T)`` positions counted as context (real, non-target tokens).
        scaling: Multiplier of ``q . k``. Default ``None``: ``D ** -0.5``.
        softcap: Tanh soft-capping of the scores (Gemma 2), if any. Default ``None``.
        segments: ``(B, T)`` sample number of each position in a packed row, or ``None``: a query then sees
            the keys of its own sample only. Default ``None``.

    Returns:
        ``(B, T)`` float32: for query ``i``, ``mean_h sum_{j <= i, context[j]} softmax_j(q_i . k_j)`` where the
        softmax runs over real positions ``j <= i`` (of ``i``'s own sample when packed) and ``i`` itself (so a
        padding query, never a target, has a defined row).
    """
    batch, heads, length, dim = query.shape
    groups = key.shape[1]
    if heads % groups:
        raise ValueError(f"{heads} query heads cannot share {groups} key heads")
    per_group = heads // groups
    scaling = dim ** -0.5 if scaling is None else scaling
    # Grouped-query attention without repeating the keys: the query heads sharing key head g (heads
    # g * per_group ... , as transformers' repeat_kv) are stacked on the query axis of one attention call.
    query = query.reshape(batch, groups, per_group, length, dim)
    key = key.float()
    # Values as wide as the keys (the fused CPU kernel needs equal widths), each the context indicator.
    weight = context.float()[:, None, :, None].expand(batch, groups, length, dim).contiguous()
    positions = torch.arange(length, device=query.device)
    valid = attention_mask.bool()[:, None, :]
    chunk = max(1, MAX_SCORES // max(1, batch * length * (heads if softcap else per_group)))
    out = []
    for start in range(0, length, chunk):
        rows = positions[start:start + chunk]
        n = rows.shape[0]
        # (B, n, T): causal over real keys, and every query (a padding one too) sees itself
        allowed = ((positions[None, :] <= rows[:, None]) & valid) | (positions[None, :] == rows[:, None])
        if segments is not None:
            allowed = allowed & (segments[:, None, :] == segments[:, start:start + n, None])
        allowed = allowed[:, None, None].expand(batch, 1, per_group, n, length).reshape(batch, 1, per_group * n, length)
        q = query[:, :, :, start:start + n].float().reshape(batch, groups, per_group * n, dim)
        if softcap:
            mass = _softcapped_mass(q, key, allowed, weight[..., 0], scaling, softcap)
        else:
            mass = F.scaled_dot_product_attention(q, key, weight, attn_mask=allowed, scale=scaling)[..., 0]
        out.append(mass.reshape(batch, heads, n).mean(dim=1))  # (B, G, per_group * n) -> head mean
    return torch.cat(out, dim=1)


def _softcapped_mass(query: Tensor, key: Tensor, allowed: Tensor, weight: Tensor, scaling: float,
                     softcap: float) -> Tensor:
    """``(B, G, Q)`` context mass of soft-capped attention, from an explicit float32 softmax.

    ``query`` is ``(B, G, Q, D)``, ``key`` ``(B, G, T, D)``, ``allowed`` ``(B, 1, Q, T)``, ``weight`` ``(B, G, T)``.
    """
    scores = torch.tanh(query @ key.transpose(-1, -2) * (scaling / softcap)) * softcap
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs * weight[:, :, None, :]).sum(-1)


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention submodule of a decoder layer (``self_attn``, ``attn``, ...)."""
    for name in ATTENTION_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the self-attention module of {type(layer).__name__} "
                     f"(looked for {', '.join(ATTENTION_NAMES)})")


@contextlib.contextmanager
def _probing(module: nn.Module) -> Iterator[None]:
    """Within: ``module`` uses the probe as its attention kernel and runs in eval mode (no dropout)."""
    config = module.config
    probed = copy.copy(config)
    # Set the private field directly: the public setter would recurse into sub-configs shared with ``config``.
    probed._attn_implementation_internal = PROBE_NAME
    module.config = probed
    try:
        with eval_mode(module):
            yield
    finally:
        module.config = config


@contextlib.contextmanager
def _gathered(layer: nn.Module) -> Iterator[None]:
    """Within: a decoder layer sharded by FSDP2 holds its full weights (gathered after its forward resharded them)."""
    from lightning_tokens.sharding import is_sharded

    if not is_sharded(layer):
        yield
        return
    layer.unshard()
    try:
        yield
    finally:
        layer.reshard()


class AttentionProbe:
    """Recomputes one decoder layer's attention to score response tokens by attention to their context.

    Args:
        model: The transformers causal LM (or a wrapper of it).
        layer: Index of the decoder layer (negative counts from the end; ``-1`` is the last).
        field: Name of the argument holding ``layer``, for error messages. Default ``"attention_layer"``.
    """

    def __init__(self, model: nn.Module, layer: int, field: str = "attention_layer") -> None:
        layers = decoder_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"{field}={layer}: the model has {len(layers)} decoder layers "
                             f"(valid: {-len(layers)} to {len(layers) - 1})")
        self.layer = layer % len(layers)
        self.decoder_layer = layers[self.layer]
        self.module = attention_module(self.decoder_layer)
        self.model_type = getattr(causal_lm_of(model).config, "model_type", type(causal_lm_of(model)).__name__)
        if not hasattr(self.module, "config"):
            raise self._refusal("has no transformers config")
        self.key = f"selection.attention.{self.layer}"

    def _refusal(self, reason: str) -> ValueError:
        return ValueError(
            f"TokenSelection's attention score (modes 'sstoken', 'attention') cannot be computed on model type "
            f"{self.model_type!r}: {type(self.module).__name__} {reason}; use TokenSelection(mode='loss'), 'rho1' or "
            "'random' (no attention needed), or a model whose attention does (llama, qwen2, mistral...)")

    @torch.no_grad()
    def check(self, model: nn.Module) -> None:
        """Refuse, before any training step, a model whose attention the probe cannot recompute.

        Runs the decoder of ``model`` on two tokens (eval mode, no cache) up to the probed attention module, then
        the probe on the inputs captured there, as :meth:`scores` does after every training forward. A model with
        weights on the meta device (not materialised yet) cannot run: it is not checked, and :meth:`scores` raises
        the same error at the first training step instead.

        Args:
            model: The causal LM (or a wrapper of it) the probe was built for.

        Raises:
            ValueError: The attention module does not call transformers' attention interface; the message names
                the model type and the modes that need no attention.
        """

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _Captured(args, kwargs)

        if any(parameter.is_meta for parameter in model.parameters()):
            return
        keep_4bit_weights_unpacked(model)  # an eval forward under no_grad on the CPU would repack 4-bit weights
        captured = None
        device = causal_lm_of(model).get_input_embeddings().weight.device
        hook = self.module.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        try:
            with eval_mode(model):
                decoder_of(model)(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        except _Captured as stopped:
            captured = stopped
        finally:
            hook.remove()
        if captured is None:
            raise RuntimeError(f"the attention module of decoder layer {self.layer} ({type(self.module).__name__}) "
                               "was not called by a forward of the model")
        try:
            probed = self._recompute(captured.args, captured.kwargs)
        except Exception as error:  # noqa: BLE001 - a module with its own attention code may fail on the probe
            raise self._refusal(f"fails under the probe ({type(error).__name__}: {error})") from error
        if probed is None:
            raise self._refusal("does not call transformers' attention interface")

    def _recompute(self, args: tuple, kwargs: dict) -> Optional[_Probed]:
        """Call the attention module on ``(args, kwargs)`` with the probe as its kernel: the query and key states it
        gave the probe, or ``None`` when it never called it."""
        # The training forward's cache already holds this layer's keys: a second update would append them
        # again. Drop it whatever it is called (``past_key_values`` up to transformers 5.23, ``cache`` after).
        args = tuple(None if isinstance(value, Cache) else value for value in args)
        kwargs = {name: None if isinstance(value, Cache) else value for name, value in kwargs.items()}
        with _probing(self.module), _gathered(self.decoder_layer):
            try:
                self.module(*args, **kwargs)
            except _Probed as probed:
                return probed
        return None

    def attach(self, dispatcher) -> None:
        """Have ``dispatcher`` capture the attention module's inputs on every training forward."""
        dispatcher.capture_inputs(self.module, self.key)

    @torch.no_grad()
    def scores(self, captured: dict, attention_mask: Tensor, context: Tensor,
               segments: Optional[Tensor] = None) -> Tensor:
        """``(B, T)`` context attention of every query position (see :func:`context_attention`; ``segments`` are
        the sample numbers of a packed batch, or ``None``)."""
        if self.key not in captured:
            raise RuntimeError(f"the inputs of decoder layer {self.layer}'s attention were not captured in this "
                               "forward; was the model called with input_ids?")
        probed = self._recompute(*captured[self.key])
        if probed is None:  # :meth:`check` refuses such a model up front; this is for a probe built without it
            raise self._refusal("does not call transformers' attention interface")
        return context_attention(probed.query, probed.key, attention_mask, context, probed.scaling, probed.softcap,
                                 segments)
