"""MultiTokenHeads: K auxiliary heads on a causal LM's trunk; head k predicts the token k places past the main head's.

The trunk output is the input of the model's last decoder layer. A ``"layer"`` head is a copy of that last
layer (so with the main head the model gets K + 1 parallel last layers, as in Gloeckle et al. 2024); a
``"resblock"`` head is Medusa's ``x + SiLU(W x)`` with ``W`` zero-initialised. Every head then goes through the
model's own final norm and unembedding (shared ``lm_head`` by default, or a private copy of it).

An ``"mtp"`` head is one depth of the model's own multi-token-prediction layers (DeepSeek-V3, GLM-4.5): the
depths are chained, reading the model's final hidden state and the tokens ahead; see
:mod:`lightning_tokens.heads.mtp`.

Layer heads are always called with an explicit causal + padding mask (an additive float mask, which eager and
SDPA attention both accept) and with the rotary embeddings the model itself computed for its last layer, so
they are causal whatever attention implementation the model uses.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_tokens.checks import check_numbers
from lightning_tokens.lean_loss import OutputProjection
from lightning_tokens.modeling import CACHE_KEYWORDS, cache_keyword, causal_lm_of, decoder_layers, decoder_of

Architecture = Literal["layer", "resblock", "mtp"]
WEIGHTS_NAME = "heads.safetensors"
CONFIG_NAME = "heads_config.json"
_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


class ResBlock(nn.Module):
    """Medusa's residual block ``x + SiLU(W x + b)``; ``W`` starts at zero, so the block starts as the identity.

    Args:
        hidden_size: Width of ``x`` (the model's hidden size). No default.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.linear(x))


@dataclass
class Trunk:
    """What the heads read: the input of the model's last decoder layer, and its positions.

    Attributes:
        hidden: ``(B, T, D)`` input hidden states of the last decoder layer; for MTP heads, the model's final
            hidden state (the output head's input).
        position_embeddings: The rotary ``(cos, sin)`` the model gave its layers, or ``None`` (gpt2).
        position_ids: ``(B, T)`` position ids the layer received, or ``None``.
        input_ids: ``(B, T)`` the input tokens, which MTP heads read ahead of each position; ``None`` for others.
    """

    hidden: Tensor
    position_embeddings: Optional[tuple[Tensor, Tensor]] = None
    position_ids: Optional[Tensor] = None
    input_ids: Optional[Tensor] = None

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict) -> "Trunk":
        """The trunk from the ``(args, kwargs)`` of a decoder-layer call."""
        hidden = args[0] if args else kwargs["hidden_states"]
        return cls(hidden, kwargs.get("position_embeddings"), kwargs.get("position_ids"))

    def detach(self) -> "Trunk":
        pe = self.position_embeddings
        return Trunk(self.hidden.detach(), None if pe is None else tuple(p.detach() for p in pe), self.position_ids,
                     self.input_ids)

    def narrow(self, start: int, length: int) -> "Trunk":
        """The trunk at positions ``start .. start + length - 1``."""
        pe = self.position_embeddings
        if pe is not None:
            pe = tuple(p.narrow(-2, start, length) if p.shape[-2] == self.hidden.shape[1] else p for p in pe)
        ids = self.position_ids
        if ids is not None and ids.shape[-1] == self.hidden.shape[1]:
            ids = ids.narrow(-1, start, length)
        tokens = None if self.input_ids is None else self.input_ids.narrow(1, start, length)
        return Trunk(self.hidden.narrow(1, start, length), pe, ids, tokens)


@contextmanager
def capture_trunk(model: nn.Module, final: bool = False) -> Iterator[dict[str, Trunk]]:
    """Record the :class:`Trunk` of ``model``'s forwards inside the block as ``holder["trunk"]`` (the last call).

    Args:
        model: The causal LM.
        final: Record what MTP heads read instead: the final hidden state (the final norm's output) and the
            input ids. Default ``False``: the last decoder layer's input.
    """
    holder: dict[str, Any] = {}

    def layer_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        holder["trunk"] = Trunk.from_call(args, kwargs)

    def ids_hook(module: nn.Module, args: tuple) -> None:
        holder["input_ids"] = args[0] if args else None

    def final_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        layer = holder.pop("trunk")
        holder["trunk"] = Trunk(output, None, layer.position_ids, holder.pop("input_ids", None))

    handles = [decoder_layers(model)[-1].register_forward_pre_hook(layer_hook, with_kwargs=True)]
    if final:
        base = causal_lm_of(model)
        handles.append(base.get_input_embeddings().register_forward_pre_hook(ids_hook))
        handles.append(final_norm(base).register_forward_hook(final_hook))
    try:
        yield holder
    finally:
        for handle in handles:
            handle.remove()


def final_norm(model: nn.Module) -> nn.Module:
    """The final norm of a causal LM (``model.norm``, ``transformer.ln_f``, ...), or the identity if it has none."""
    inner = causal_lm_of(model).base_model
    for name in _NORM_NAMES:
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


def causal_additive_mask(attention_mask: Optional[Tensor], query_length: int, past_length: int,
                         dtype: torch.dtype, device: torch.device, batch_size: int = 1,
                         segments: Optional[Tensor] = None) -> Tensor:
    """``(B, 1, q, past + q)`` additive mask: 0 where a query may attend, the dtype's minimum elsewhere.

    A query sees keys at or before its own position that are not padding; it always sees itself, so no row
    is empty (padding queries give finite, unused outputs instead of NaN).

    Args:
        attention_mask: ``(B, past + q)`` 1 on real tokens, or ``None`` for no padding.
        query_length: Number of queries ``q`` (the last ``q`` positions).
        past_length: Number of cached positions before the queries.
        dtype: Dtype of the mask (that of the attention scores).
        device: Its device.
        batch_size: ``B`` when ``attention_mask`` is ``None``. Default ``1``.
        segments: ``(B, past + q)`` sample number of each position of a packed row, or ``None``: a query then
            sees the keys of its own sample only. Default ``None``.
    """
    total = past_length + query_length
    query_pos = torch.arange(past_length, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :total].bool()
    else:
        allowed = allowed.expand(batch_size, -1, -1)
    if segments is not None:
        allowed = allowed & (segments[:, None, :total] == segments[:, past_length:total, None])
    allowed = allowed | (key_pos == query_pos)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


#: Arguments of a decoder layer's forward that :meth:`MultiTokenHeads.head_states` fills itself.
_GIVEN_ARGUMENTS = frozenset({"attention_mask", "position_embeddings", "position_ids", "use_cache", *CACHE_KEYWORDS})


def unused_layer_arguments(model: nn.Module, layer: nn.Module) -> tuple[str, ...]:
    """The arguments ``layer``'s forward requires that layer heads do not give, each checked to be ``None`` in the
    model's own call of ``layer`` (Falcon's ``alibi`` without ALiBi); heads pass them as ``None``.

    One forward of two tokens, under ``no_grad``, records the model's own call of ``layer``.

    Raises:
        ValueError: The model gives ``layer`` a position bias, as such an argument (Falcon's ALiBi on transformers
            5.23) or added to its attention mask (Falcon's ALiBi on later versions): a head, run with its own mask,
            would leave it out. Names the model type and the argument.
    """
    parameters = list(inspect.signature(type(layer).forward).parameters.values())[2:]  # self, hidden_states
    required = tuple(p.name for p in parameters if p.default is p.empty and p.name not in _GIVEN_ARGUMENTS
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    base = causal_lm_of(model)
    calls: list[inspect.BoundArguments] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(inspect.signature(module.forward).bind_partial(*args, **kwargs))

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    device = base.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            decoder_of(base)(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        handle.remove()
    given = calls[0].arguments if calls else {}
    biased = [name for name in required if given.get(name) is not None]
    if _is_biased_mask(given.get("attention_mask")):
        biased.append("attention_mask")
    if biased:
        model_type = getattr(base.config, "model_type", type(base).__name__)
        raise ValueError(f"MultiTokenHeads: the decoder layers of model type {model_type!r} take {biased[0]!r} with a "
                         "position bias from the model (ALiBi), which a layer head run with its own mask would leave "
                         "out; use architecture='resblock'")
    return required


def _is_biased_mask(mask: Any) -> bool:
    """Whether an additive attention mask holds anything but 0 and large negatives (a position bias added to it)."""
    if not isinstance(mask, Tensor) or not mask.is_floating_point():
        return False
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    return bool((mask.masked_fill(hidden, 0) != 0).any())


def _source_weight(module: nn.Module) -> Tensor:
    """A linear module's weight in full precision, through PEFT wrappers and bitsandbytes quantization."""
    module = getattr(module, "base_layer", module)
    weight = module.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module)
    return weight


def _copy_from_layer(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s base weights into ``target`` (same class); LoRA adapters and quantization are undone."""
    with torch.no_grad():
        for name, param in target.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = source.get_submodule(owner_name) if owner_name else source
            owner = getattr(owner, "base_layer", owner)
            value = _source_weight(owner) if leaf == "weight" else getattr(owner, leaf)
            if value.shape != param.shape and value.numel() == param.numel():
                value = value.reshape(param.shape)  # gpt2 Conv1D stores the same weights
            param.copy_(value.to(param.dtype))


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
            whose config has ``num_mtp_layers`` (:mod:`~lightning_tokens.heads.mtp`; :meth:`from_model` loads
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
        if architecture not in ("layer", "resblock", "mtp"):
            raise ValueError(f"MultiTokenHeads.architecture must be 'layer', 'resblock' or 'mtp', got {architecture!r}")
        if architecture == "mtp" and separate_unembedding:
            raise ValueError("MultiTokenHeads: MTP heads share the model's lm_head (transformers' MtpModel reads no "
                             "other), so separate_unembedding must be False")
        base = causal_lm_of(model)
        lm_head = base.get_output_embeddings()
        vocab_size, hidden_size = lm_head.weight.shape[0], lm_head.weight.shape[-1]
        dtype = lm_head.weight.dtype if lm_head.weight.is_floating_point() else torch.float32
        self.num_heads, self.architecture, self.separate_unembedding = num_heads, architecture, separate_unembedding
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        last = decoder_layers(base)[-1]
        self.layer_index = len(decoder_layers(base)) - 1
        #: The norm all MTP depths end with in some layouts (Inkling's ``chain_norm``); ``None`` for other heads.
        self.shared_post_norm: Optional[nn.Module] = None
        #: Arguments the last layer's forward requires beyond those head_states gives: ``None`` in the model's calls.
        self.unused_arguments = unused_layer_arguments(base, last) if architecture == "layer" else ()
        if architecture == "mtp":
            from lightning_tokens.heads.mtp import build_mtp_layers

            self.blocks, self.shared_post_norm = build_mtp_layers(base, num_heads)
            same_kind = set(dict(self.blocks[0].mtp_block.named_parameters())) == set(dict(last.named_parameters()))
            if init_from_model and not same_kind:  # e.g. a dense last layer where MTP layers use experts
                warnings.warn(f"MultiTokenHeads: the last decoder layer's weights do not fit an MTP layer of "
                              f"{type(base).__name__}; the MTP layers start from a fresh initialisation", stacklevel=2)
            if init_from_model and same_kind:
                for layer in self.blocks:
                    _copy_from_layer(layer.mtp_block, last)
        else:
            blocks = []
            for _ in range(num_heads):
                if architecture == "resblock":
                    blocks.append(ResBlock(hidden_size))
                    continue
                block = type(last)(base.config, self.layer_index)
                if init_from_model:
                    _copy_from_layer(block, last)
                blocks.append(block)
            self.blocks = nn.ModuleList(blocks)
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
        from lightning_tokens.heads.mtp import checkpoint_depths, read_checkpoint_layers

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
        if self.architecture == "mtp":
            raise ValueError("MultiTokenHeads.head_states: MTP depths are chained; use all_head_states")
        block = self.blocks[k - 1]
        dtype = next(block.parameters()).dtype
        hidden = trunk.hidden.to(dtype)
        if self.architecture == "resblock":
            return block(hidden)
        batch, length = hidden.shape[:2]
        mask = additive_mask if additive_mask is not None else causal_additive_mask(
            attention_mask, length, past_length, dtype, hidden.device, batch, segments)
        kwargs: dict[str, Any] = {"attention_mask": mask, cache_keyword(block): cache, "use_cache": cache is not None,
                                  **dict.fromkeys(self.unused_arguments)}
        if trunk.position_embeddings is not None:
            kwargs["position_embeddings"] = tuple(p.to(dtype) for p in trunk.position_embeddings)
        if trunk.position_ids is not None:
            kwargs["position_ids"] = trunk.position_ids
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

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
        if self.architecture == "mtp":
            from lightning_tokens.heads.mtp import training_states

            yield from training_states(self, model, trunk, attention_mask, segments, depths)
            return
        for k in range(1, (depths or self.num_heads) + 1):
            yield self.head_states(k, trunk, attention_mask, segments=segments)

    def unembedding(self, model: nn.Module, k: int) -> nn.Module:
        """The output layer of head ``k``: its own copy, or the model's ``lm_head``."""
        return self.unembeddings[k - 1] if self.unembeddings is not None else causal_lm_of(model).get_output_embeddings()

    def _norm(self, model: nn.Module) -> nn.Module:
        """The norm before the unembedding: the model's final norm (an MTP depth ends with its own)."""
        return nn.Identity() if self.architecture == "mtp" else final_norm(causal_lm_of(model))

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
        :func:`~lightning_tokens.heads.loss.head_losses`, which never builds them."""
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
        for name, content in ((WEIGHTS_NAME, None), (CONFIG_NAME, json.dumps(self.config, indent=2))):
            fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
            os.close(fd)
            try:
                if content is None:
                    save_file(tensors, tmp, metadata={"format": "pt"})
                else:
                    Path(tmp).write_text(content)
                os.replace(tmp, path / name)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
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
                raise ValueError(f"MultiTokenHeads.load: {key} has shape {tuple(tensor.shape)} in {path / WEIGHTS_NAME}, "
                                 f"the model's heads need {tuple(expected[key].shape)}")
        heads.load_state_dict(saved)
        return heads


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return default
