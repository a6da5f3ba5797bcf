"""MultiTokenHeads: K auxiliary heads on a causal LM's trunk; head k predicts the token k places past the main head's.

The trunk output is the input of the model's last decoder layer (:mod:`~lightning_tokens.caft.trunk`). What a head
is depends on its variant, chosen once from the ``architecture`` string by :func:`head_variant`:

- ``"layer"`` (:mod:`~lightning_tokens.caft.layer`): a copy of that last layer, so with the main head the model
  gets K + 1 parallel last layers, as in Gloeckle et al. 2024;
- ``"resblock"`` (:mod:`~lightning_tokens.caft.resblock`): Medusa's ``x + SiLU(W x)`` with ``W`` zero-initialised;
- ``"mtp"`` (:mod:`~lightning_tokens.caft.mtp`): one depth of the model's own multi-token-prediction layers
  (DeepSeek-V3, GLM-4.5); the depths are chained, reading the model's final hidden state and the tokens ahead.

Layer and resblock heads then go through the model's own final norm and unembedding (shared ``lm_head`` by
default, or a private copy of it); MTP depths end with their own norm and share ``lm_head``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_tokens.caft.layer import LayerVariant, unused_layer_arguments
from lightning_tokens.caft.mtp import MtpVariant, checkpoint_depths, read_checkpoint_layers
from lightning_tokens.caft.resblock import ResBlock, ResBlockVariant
from lightning_tokens.caft.trunk import Trunk, capture_trunk, causal_additive_mask, final_norm
from lightning_tokens.caft.variant import HeadVariant
from lightning_tokens.checks import check_numbers
from lightning_tokens.files import atomic_path
from lightning_tokens.lean_loss import OutputProjection
from lightning_tokens.modeling import causal_lm_of, decoder_layers

__all__ = ["Architecture", "CONFIG_NAME", "HeadVariant", "MultiTokenHeads", "ResBlock", "Trunk", "WEIGHTS_NAME",
           "capture_trunk", "causal_additive_mask", "final_norm", "head_variant", "unused_layer_arguments"]

Architecture = Literal["layer", "resblock", "mtp"]
WEIGHTS_NAME = "heads.safetensors"
CONFIG_NAME = "heads_config.json"
_VARIANTS: dict[str, type[HeadVariant]] = {kind.name: kind for kind in (LayerVariant, ResBlockVariant, MtpVariant)}


def head_variant(architecture: str) -> HeadVariant:
    """A fresh variant of the kind ``architecture`` names (``"layer"``, ``"resblock"`` or ``"mtp"``).

    Raises:
        ValueError: ``architecture`` names no variant.
    """
    if not isinstance(architecture, str) or architecture not in _VARIANTS:
        raise ValueError(f"MultiTokenHeads.architecture must be 'layer', 'resblock' or 'mtp', got {architecture!r}")
    return _VARIANTS[architecture]()


class MultiTokenHeads(nn.Module):
    """K auxiliary heads; head ``k`` (1..K) at position ``t`` predicts the token at ``t + 1 + k``.

    The heads are built for one causal LM and read its trunk (the input of its last decoder layer, see
    :class:`Trunk`); the model's final norm and ``lm_head`` are used but never registered here, so the heads'
    ``state_dict`` holds the heads alone. Move them with ``.to()`` like any module.

    Args:
        model: The causal LM (plain, PEFT-wrapped or quantized) whose trunk the heads read.
        num_heads: Number of auxiliary heads K (paper: ``caft_num_heads``). Default ``4``.
        architecture: ``"layer"``, a copy of the model's last decoder layer (reference code: ``head_arch=
            "transformer"``); ``"resblock"``, Medusa's ``x + SiLU(W x)`` with ``W`` zero-initialised
            (reference code: ``"linear"``); or ``"mtp"``, transformers' multi-token-prediction layers for a model
            whose config has ``num_mtp_layers`` (:mod:`~lightning_tokens.caft.mtp`; :meth:`from_model` loads
            the checkpoint's own). Default ``"layer"``.
        separate_unembedding: Give every head its own unembedding initialised from ``lm_head`` instead of
            sharing it (K more vocabulary-sized matrices). Default ``False``. MTP heads share ``lm_head``.
        init_from_model: Initialise layer heads, and the decoder layer of fresh MTP heads, with the last layer's
            weights (dequantized, LoRA left out). Default ``True``; ``False`` when the weights will be loaded anyway.
    """

    def __init__(self, model: nn.Module, num_heads: int = 4, architecture: Architecture = "layer",
                 separate_unembedding: bool = False, init_from_model: bool = True) -> None:
        super().__init__()
        check_numbers("MultiTokenHeads", num_heads=(num_heads, "an integer >= 1"))
        #: What these heads are (:class:`~lightning_tokens.caft.variant.HeadVariant`), chosen once here.
        self.variant = head_variant(architecture)
        self.variant.check(separate_unembedding)
        base = causal_lm_of(model)
        lm_head = base.get_output_embeddings()
        vocab_size, hidden_size = lm_head.weight.shape[0], lm_head.weight.shape[-1]
        dtype = lm_head.weight.dtype if lm_head.weight.is_floating_point() else torch.float32
        self.num_heads, self.separate_unembedding = num_heads, separate_unembedding
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        last = decoder_layers(base)[-1]
        self.layer_index = len(decoder_layers(base)) - 1
        #: The norm all MTP depths end with in some layouts (Inkling's ``chain_norm``); ``None`` for other heads.
        self.shared_post_norm: Optional[nn.Module] = None
        self.blocks, self.shared_post_norm = self.variant.build(base, num_heads, init_from_model)
        self.to(dtype=dtype, device=lm_head.weight.device)
        self.unembeddings: Optional[nn.ModuleList] = None
        if separate_unembedding:
            heads = []
            for _ in range(num_heads):
                linear = nn.Linear(hidden_size, vocab_size, bias=False, dtype=dtype, device=lm_head.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(lm_head.weight)
                heads.append(linear)
            self.unembeddings = nn.ModuleList(heads)
        self.model_type = getattr(base.config, "model_type", None)
        self.layer_class = type(last).__name__

    @classmethod
    def from_model(cls, model: nn.Module, num_heads: Optional[int] = None) -> "MultiTokenHeads":
        """MTP heads holding the MTP layers of ``model``'s own checkpoint: trained heads, so stage 1 is optional.

        The weights are read by transformers' ``MtpModel.from_pretrained`` from the checkpoint ``model`` was
        loaded from. Depths past those the checkpoint has (DeepSeek-V3 ships one) start as copies of its last
        one, with a warning.

        Args:
            model: A causal LM loaded from a checkpoint whose config has ``num_mtp_layers`` (plain, PEFT or
                quantized: the MTP layers load unquantized).
            num_heads: Number of depths K. Default ``None``: the checkpoint's ``num_mtp_layers``.

        Raises:
            ValueError: the model has no MTP layers, was built from a config, or its checkpoint lacks them.
        """
        available = checkpoint_depths(model)
        layers = read_checkpoint_layers(model)
        num_heads = available if num_heads is None else num_heads
        heads = cls(model, num_heads=num_heads, architecture="mtp", init_from_model=False)
        for k, layer in enumerate(heads.blocks):
            layer.load_state_dict(layers[min(k, len(layers) - 1)].state_dict())
        if num_heads > len(layers):
            warnings.warn(f"MultiTokenHeads.from_model: the checkpoint has {len(layers)} MTP layer(s); depths "
                          f"{len(layers) + 1}..{num_heads} start as copies of depth {len(layers)}", stacklevel=2)
        return heads

    @property
    def architecture(self) -> Architecture:
        """``"layer"``, ``"resblock"`` or ``"mtp"``: the kind of these heads."""
        return self.variant.name

    @property
    def unused_arguments(self) -> tuple[str, ...]:
        """Arguments the heads' layers require beyond those :meth:`head_states` gives, passed as ``None`` (they are
        ``None`` in the model's own calls of its last layer, see :func:`unused_layer_arguments`)."""
        return self.variant.unused_arguments

    @property
    def weight_dtype(self) -> torch.dtype:
        """Dtype of the heads' weights."""
        return next(self.blocks.parameters()).dtype

    # -- description -----------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """What is needed to rebuild these heads for a model (written next to the weights)."""
        return dict(num_heads=self.num_heads, architecture=self.architecture,
                    separate_unembedding=self.separate_unembedding, hidden_size=self.hidden_size,
                    vocab_size=self.vocab_size, model_type=self.model_type, layer_class=self.layer_class)

    # -- forward ---------------------------------------------------------------------------------------
    def head_states(self, k: int, trunk: Trunk, attention_mask: Optional[Tensor] = None,
                    cache: Any = None, past_length: int = 0, segments: Optional[Tensor] = None,
                    additive_mask: Optional[Tensor] = None) -> Tensor:
        """Hidden states of head ``k`` (1-based) over the trunk, before the final norm: ``(B, T, D)``.

        Args:
            k: Head number, ``1..num_heads``.
            trunk: The trunk of the positions to run.
            attention_mask: ``(B, past_length + T)`` padding mask, or ``None``.
            cache: A transformers ``Cache`` of this head's own past keys/values (decoding), or ``None``.
            past_length: Positions already in ``cache``.
            segments: ``(B, past_length + T)`` sample numbers of a packed batch, or ``None``.
            additive_mask: The :func:`causal_additive_mask` of the call, when the caller has it already (one
                mask serves every layer head); ``None`` builds it.
        """
        return self.variant.head_states(self, k, trunk, attention_mask, cache, past_length, segments, additive_mask)

    def all_head_states(self, model: nn.Module, trunk: Trunk, attention_mask: Optional[Tensor] = None,
                        segments: Optional[Tensor] = None, depths: Optional[int] = None) -> Iterator[Tensor]:
        """Hidden states of heads ``1..depths`` in order (see :meth:`head_states`); MTP depths are chained, each
        ``(B, T - k, D)``, where the others are independent ``(B, T, D)``.

        Args:
            model: The causal LM the heads belong to.
            trunk: The trunk of the positions to run.
            attention_mask: ``(B, T)`` padding mask, or ``None``.
            segments: ``(B, T)`` sample numbers of a packed batch, or ``None``.
            depths: How many heads. Default ``None``: all.
        """
        yield from self.variant.all_head_states(self, model, trunk, attention_mask, segments, depths)

    def unembedding(self, model: nn.Module, k: int) -> nn.Module:
        """The output layer of head ``k``: its own copy, or the model's ``lm_head``."""
        if self.unembeddings is not None:
            return self.unembeddings[k - 1]
        return causal_lm_of(model).get_output_embeddings()

    def _norm(self, model: nn.Module) -> nn.Module:
        """The norm before the unembedding: the model's final norm (an MTP depth ends with its own)."""
        return self.variant.norm(model)

    def normed(self, model: nn.Module, k: int, states: Tensor) -> Tensor:
        """Head ``k``'s hidden states through the model's final norm, in the dtype of its unembedding."""
        norm = self._norm(model)
        normed = norm(states.to(_param_dtype(norm, states.dtype)))
        return normed.to(_param_dtype(self.unembedding(model, k), normed.dtype))

    def projector(self, model: nn.Module, k: int):
        """:meth:`project` for head ``k`` with the model's modules looked up once: a function of the states, for
        decoding loops that project a few rows per step."""
        norm = self._norm(model)
        unembedding = self.unembedding(model, k)
        projection = OutputProjection(model, unembedding)
        norm_dtype = _param_dtype(norm, None)
        head_dtype = _param_dtype(unembedding, None)

        def project(states: Tensor) -> Tensor:
            normed = norm(states if norm_dtype is None else states.to(norm_dtype))
            return projection(normed if head_dtype is None else normed.to(head_dtype))

        return project

    def project(self, model: nn.Module, k: int, states: Tensor) -> Tensor:
        """Logits of head ``k`` from its hidden states (any leading shape): final norm, then unembedding, then the
        model's own logit post-processing (soft-capping, scaling), as float32."""
        return self.projector(model, k)(states)

    def forward(self, model: nn.Module, trunk: Trunk, attention_mask: Optional[Tensor] = None) -> list[Tensor]:
        """Full logits ``(B, T, V)`` of every head, a list of K. For inspection and tests: training should use
        :func:`~lightning_tokens.caft.loss.head_losses`, which never builds them."""
        states = self.all_head_states(model, trunk, attention_mask)
        return [self.project(model, k, item) for k, item in enumerate(states, start=1)]

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, state_dict: Optional[dict[str, Tensor]] = None) -> Path:
        """Write the heads alone to directory ``path``: ``heads.safetensors`` and ``heads_config.json``.

        Args:
            path: The directory.
            state_dict: The weights to write. Default ``None``: ``self.state_dict()`` (for sharded heads, pass
                the gathered :func:`~lightning_tokens.sharding.full_state_dict`).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        with atomic_path(path / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> "MultiTokenHeads":
        """Heads saved by :meth:`save`, rebuilt for ``model``; keys and shapes must match exactly.

        Raises:
            FileNotFoundError: ``path`` lacks ``heads.safetensors`` or ``heads_config.json``.
            ValueError: The saved heads do not fit ``model`` (names the key and both shapes).
        """
        from safetensors.torch import load_file

        path = Path(path)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"MultiTokenHeads.load: {path / name} does not exist")
        config = json.loads((path / CONFIG_NAME).read_text())
        try:
            heads = cls(model, num_heads=config["num_heads"], architecture=config["architecture"],
                        separate_unembedding=config["separate_unembedding"], init_from_model=False)
        except KeyError as error:
            raise ValueError(f"MultiTokenHeads.load: {path / CONFIG_NAME} lacks the field {error}") from None
        for field_name in ("hidden_size", "vocab_size"):
            if config.get(field_name) is not None and config[field_name] != getattr(heads, field_name):
                raise ValueError(f"MultiTokenHeads.load: {path} was saved for {field_name}={config[field_name]}, "
                                 f"the model has {getattr(heads, field_name)}")
        saved = load_file(str(path / WEIGHTS_NAME))
        expected = heads.state_dict()
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise ValueError(f"MultiTokenHeads.load: {path / WEIGHTS_NAME} does not match the model's heads: "
                             f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for key, tensor in saved.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(f"MultiTokenHeads.load: {key} has shape {tuple(tensor.shape)} in "
                                 f"{path / WEIGHTS_NAME}, the model's heads need {tuple(expected[key].shape)}")
        heads.load_state_dict(saved)
        return heads


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return default
