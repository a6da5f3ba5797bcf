"""Heads on a model's own multi-token-prediction (MTP) layers: DeepSeek-V3, GLM-4.5 and the others transformers
gives a ``num_mtp_layers`` config field.

Depth ``k`` (1..K) is a transformers ``MtpLayer``, chained as in DeepSeek-V3 (arXiv 2412.19437, section 2.2):
at position ``t`` it projects ``[enorm(embedding of token t + k), hnorm(depth k-1's state at t)]`` to the hidden
size, runs one decoder layer over the sequence and its own final norm, and the model's ``lm_head`` reads the
result as a prediction of token ``t + k + 1``. Depth 0's state is the model's final hidden state (the output
head's input). Head ``k`` of CAFT predicts the same token from the same position, so ``CE_k`` is depth ``k``'s
loss. Depth ``k``'s attention runs at the positions of the tokens it reads, ``t + k``, as transformers' own
``MtpModel`` does, so weights trained here decode there unchanged.

A depth reads a token ``k`` places ahead, so under padding (or packing) position ``t`` of depth ``k`` is real only
when both position ``t`` and token ``t + k`` are real tokens (of the same sample); every other key is masked.

:class:`MtpVariant` is the head variant ``MultiTokenHeads(architecture="mtp")`` holds.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import Tensor, nn

from lightning_tokens.caft.layer import copy_layer_weights
from lightning_tokens.caft.mtp_drafter import MtpDrafter
from lightning_tokens.caft.trunk import Trunk, causal_additive_mask
from lightning_tokens.caft.variant import HeadVariant
from lightning_tokens.modeling import (
    cache_keyword,
    causal_lm_of,
    decoder_layers,
    decoder_of,
    is_peft_model,
    is_quantized,
)

if TYPE_CHECKING:
    from lightning_tokens.caft.heads import MultiTokenHeads

SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
SAFE_WEIGHTS = "model.safetensors"
MTP_SHARD = "model-mtp.safetensors"


class MtpVariant(HeadVariant):
    """Heads that are the model's own MTP layers, chained depth after depth; they read the model's final hidden
    state and the input ids, end with their own norm and share the model's ``lm_head``."""

    name = "mtp"
    reads_final_hidden = True
    attends = True
    in_checkpoint = True

    def check(self, separate_unembedding: bool) -> None:
        if separate_unembedding:
            raise ValueError("MultiTokenHeads: MTP heads share the model's lm_head (transformers' MtpModel reads no "
                             "other), so separate_unembedding must be False")

    def build(self, base: nn.Module, num_heads: int,
              init_from_model: bool) -> tuple[nn.ModuleList, Optional[nn.Module]]:
        blocks, shared_post_norm = build_mtp_layers(base, num_heads)
        last = decoder_layers(base)[-1]
        same_kind = set(dict(blocks[0].mtp_block.named_parameters())) == set(dict(last.named_parameters()))
        if init_from_model and not same_kind:  # e.g. a dense last layer where MTP layers use experts
            warnings.warn(f"MultiTokenHeads: the last decoder layer's weights do not fit an MTP layer of "
                          f"{type(base).__name__}; the MTP layers start from a fresh initialisation", stacklevel=3)
        if init_from_model and same_kind:
            for layer in blocks:
                copy_layer_weights(layer.mtp_block, last)
        return blocks, shared_post_norm

    def head_states(self, heads: MultiTokenHeads, k: int, trunk: Trunk, attention_mask: Optional[Tensor],
                    cache: Any, past_length: int, segments: Optional[Tensor],
                    additive_mask: Optional[Tensor]) -> Tensor:
        raise ValueError("MultiTokenHeads.head_states: MTP depths are chained; use all_head_states")

    def all_head_states(self, heads: MultiTokenHeads, model: nn.Module, trunk: Trunk,
                        attention_mask: Optional[Tensor], segments: Optional[Tensor],
                        depths: Optional[int]) -> Iterator[Tensor]:
        yield from training_states(heads, model, trunk, attention_mask, segments, depths)

    def norm(self, model: nn.Module) -> nn.Module:
        return nn.Identity()  # every depth ends with its own norm

    def drafter(self, heads: MultiTokenHeads, model: nn.Module, num_draft: int, prompt_ids: Tensor,
                prompt_mask: Tensor, max_new_tokens: int) -> MtpDrafter:
        return MtpDrafter(heads, model, num_draft, prompt_ids, prompt_mask, max_new_tokens)

    def depth_states(self, heads: MultiTokenHeads, model: nn.Module, k: int, previous: Tensor, tokens: Tensor,
                     positions: Tensor, mask: Tensor, cache: Any = None) -> Tensor:
        """:func:`depth_states`, for the drafter (which this module imports, so it cannot import this module)."""
        return depth_states(heads, model, k, previous, tokens, positions, mask, cache)


def checkpoint_depths(model: nn.Module) -> Optional[int]:
    """``num_mtp_layers`` of the model's config (the MTP depths its checkpoint carries), or ``None`` if it has none."""
    return getattr(causal_lm_of(model).config.get_text_config(), "num_mtp_layers", None)


def build_mtp_layers(model: nn.Module, num_depths: int) -> tuple[nn.ModuleList, Optional[nn.Module]]:
    """``num_depths`` fresh ``MtpLayer`` s for ``model`` and the shared post-norm some layouts chain through, or
    ``None``.

    They are built by transformers' ``MtpModel`` (its layer and norm classes, its config), then taken out of it:
    the embeddings, ``lm_head`` and rotary embedding it would share with the model stay the model's own.
    """
    from transformers.modeling_layers import MtpModel

    base = causal_lm_of(model)
    if checkpoint_depths(base) is None:
        raise ValueError(
            f"MultiTokenHeads(architecture='mtp'): {type(base.config).__name__} has no num_mtp_layers, so transformers "
            "has no multi-token-prediction layers for it (deepseek_v3, glm4_moe and others do): use 'layer' or "
            "'resblock'")
    mtp = MtpModel(base, num_depths)
    return mtp.layers, getattr(mtp, "shared_post_norm", None)


def _layers_prefix(base: nn.Module) -> str:
    """``"model.layers."``: where a checkpoint of ``base``'s class keeps its decoder layers (and DeepSeek-style MTP)."""
    return f"{base.base_model_prefix}.layers."


def _keeps_mtp_after_layers(base: nn.Module) -> bool:
    """Whether ``base``'s class stores MTP depths as extra decoder layers (``model.layers.{L + k}.``), as DeepSeek-V3
    and GLM-4.5 checkpoints do (other layouts, ``model.mtp.`` and ``mtp.``, are read by ``from_model`` only)."""
    patterns = base._keys_to_ignore_on_load_unexpected or []
    return any(pattern.startswith(re.escape(_layers_prefix(base))) for pattern in patterns)


@contextmanager
def _mtp_checkpoint(base: nn.Module, path: Optional[str | os.PathLike], depths: Optional[int]) -> Iterator[None]:
    """Point transformers' ``MtpModel.from_pretrained(base)`` at ``path`` with ``depths`` layers, for the block.

    transformers finds the MTP weights with patterns written for the flagship checkpoint's depth (DeepSeek-V3's
    ``model.layers.61``); for the layers-after-the-decoder layout the patterns are set to this model's own depth.
    """
    config = base.config.get_text_config()
    saved = dict(name=config._name_or_path, depths=getattr(config, "num_mtp_layers", None),
                 patterns=base.__dict__.get("_keys_to_ignore_on_load_unexpected"), dtype=base.config.dtype)
    try:
        if isinstance(base.config.dtype, str):  # a config built from a dict names it; the loader needs the dtype
            base.config.dtype = getattr(torch, base.config.dtype)
        if path is not None:
            config._name_or_path = str(path)
            base.config._name_or_path = str(path)
        if depths is not None:
            config.num_mtp_layers = depths
        if _keeps_mtp_after_layers(base):
            first = config.num_hidden_layers
            count = config.num_mtp_layers
            base._keys_to_ignore_on_load_unexpected = [
                re.escape(f"{_layers_prefix(base)}{first + k}.") + ".*" for k in range(count)]
        yield
    finally:
        base.config.dtype = saved["dtype"]
        config._name_or_path = saved["name"]
        base.config._name_or_path = saved["name"]
        config.num_mtp_layers = saved["depths"]
        if saved["patterns"] is None:
            base.__dict__.pop("_keys_to_ignore_on_load_unexpected", None)
        else:
            base._keys_to_ignore_on_load_unexpected = saved["patterns"]


def read_checkpoint_layers(model: nn.Module, path: Optional[str | os.PathLike] = None,
                           depths: Optional[int] = None) -> nn.ModuleList:
    """The MTP layers of ``model``'s checkpoint (or of ``path``), loaded by transformers' ``MtpModel.from_pretrained``.

    Raises:
        ValueError: the config has no ``num_mtp_layers``, or the checkpoint holds no MTP weights.
    """
    from transformers.modeling_layers import MtpModel

    base = causal_lm_of(model)
    if checkpoint_depths(base) is None and depths is None:
        raise ValueError(f"{type(base.config).__name__} has no num_mtp_layers: its checkpoints carry no MTP layers")
    source = path if path is not None else base.config._name_or_path
    if not source:
        raise ValueError("MultiTokenHeads.from_model: the model was built from a config, not loaded from a checkpoint, "
                         "so it has no MTP weights to load; build fresh heads with MultiTokenHeads(model, "
                         "architecture='mtp') and pre-train them (stage 1)")
    device = next(decoder_of(base).parameters()).device
    try:
        with _mtp_checkpoint(base, path, depths), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mtp = MtpModel.from_pretrained(base, device_map={"": device})
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"MultiTokenHeads.from_model: no MTP layers could be read from {source}: {error}") from None
    return mtp.layers


def depth_states(heads: MultiTokenHeads, model: nn.Module, k: int, previous: Tensor, tokens: Tensor,
                 positions: Tensor, mask: Tensor, cache=None) -> Tensor:
    """Depth ``k``'s output over a run of positions: ``(B, n, D)``, after its own final norm.

    Args:
        heads: MTP heads.
        model: Their causal LM (embeddings and rotary embedding).
        k: Depth, ``1..num_heads``.
        previous: ``(B, n, D)`` depth ``k - 1``'s states at the positions (depth 0: the final hidden state).
        tokens: ``(B, n)`` the token ``k`` places after each position.
        positions: ``(B, n)`` position ids of those tokens.
        mask: ``(B, 1, n, past + n)`` additive attention mask.
        cache: Cache of the depths' past keys and values (depth ``k`` at layer ``k - 1``), or ``None``.
    """
    base = causal_lm_of(model)
    layer = heads.blocks[k - 1]
    dtype = heads.weight_dtype
    embedding = base.get_input_embeddings()
    # MtpModel bypasses an embedding's own norm (embed_norm); the lookup alone is what it reads
    embeds = (nn.functional.embedding(tokens, embedding.weight) if hasattr(embedding, "embed_norm")
              else embedding(tokens)).to(dtype)
    rotary = getattr(decoder_of(base), "rotary_emb", None)
    position_embeddings = None
    if rotary is not None:
        position_embeddings = tuple(p.to(dtype) for p in rotary(embeds, position_ids=positions))
    states = layer(embeds, previous.to(dtype), position_embeddings=position_embeddings, attention_mask=mask,
                   position_ids=positions, **{cache_keyword(layer): cache})
    if heads.shared_post_norm is not None:
        states = heads.shared_post_norm(states)
    return states


def training_states(heads: MultiTokenHeads, model: nn.Module, trunk: Trunk,
                    attention_mask: Optional[Tensor] = None, segments: Optional[Tensor] = None,
                    depths: Optional[int] = None) -> Iterator[Tensor]:
    """Every depth's states over a whole batch, in order: depth ``k`` gives ``(B, T - k, D)``, its position ``t``
    predicting token ``t + k + 1``.

    Args:
        heads: MTP heads.
        model: Their causal LM.
        trunk: Its final hidden states, input ids and position ids on the batch.
        attention_mask: ``(B, T)`` 1 on real tokens, or ``None``.
        segments: ``(B, T)`` sample numbers of a packed batch, or ``None``.
        depths: How many depths to run. Default ``None``: all.
    """
    if trunk.input_ids is None:
        raise ValueError("MTP heads read the tokens ahead of each position: the model must be called with input_ids")
    hidden, ids = trunk.hidden, trunk.input_ids
    batch, length = ids.shape
    positions = trunk.position_ids
    if positions is None:
        positions = torch.arange(length, device=ids.device)
    positions = positions.expand(batch, length)
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    previous = hidden
    for k in range(1, (depths or heads.num_heads) + 1):
        n = max(length - k, 0)
        if n == 0:  # too short for this depth and the deeper ones
            previous = previous[:, :0]
            yield previous
            continue
        valid = real[:, :n] & real[:, k:]
        same = None if segments is None else segments[:, :n]
        if segments is not None:
            valid = valid & (segments[:, :n] == segments[:, k:])
        mask = causal_additive_mask(valid, n, 0, heads.weight_dtype, ids.device, batch, same)
        previous = depth_states(heads, model, k, previous[:, :n], ids[:, k:], positions[:, k:], mask)
        yield previous


def export_mtp(model: nn.Module, heads: MultiTokenHeads, path: str | os.PathLike,
               include_shared: bool = True, tokenizer: Any = None, max_shard_size: Optional[str] = None) -> Path:
    """Write ``model`` with ``heads`` as its MTP layers, in the layout of its own checkpoints.

    The model is written by ``save_pretrained`` (LoRA adapters merged into a copy first); depth ``k`` is added
    as decoder layer ``L + k - 1`` (``model.layers.{L + k - 1}.``: the block's weights as the model's own layers
    store them, plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``) and ``num_mtp_layers`` is set
    to K. ``from_pretrained`` then ``generate(use_mtp=True)`` decode with these layers, as do serving engines
    that read DeepSeek-V3 checkpoints. The written layers are read back through transformers' ``MtpModel`` and
    compared with ``heads`` before returning.

    Args:
        model: The causal LM (plain or PEFT-wrapped, not quantized).
        heads: Its MTP heads (``architecture="mtp"``).
        path: Output directory.
        include_shared: Also write each depth's copy of the embeddings and output head
            (``embed_tokens``, ``shared_head.head``), as DeepSeek-V3's own checkpoint carries. transformers does
            not read them. Default ``True``.
        tokenizer: Written to ``path`` too when given. Default ``None``.
        max_shard_size: ``save_pretrained``'s shard size (``"5GB"``...); the MTP layers then go to a shard of
            their own, ``model-mtp.safetensors``, listed in the index. Default ``None``: transformers' default.

    Raises:
        ValueError: ``heads`` are not MTP heads, or the model is quantized.
        NotImplementedError: the model's class keeps its MTP weights in another layout.
    """
    from safetensors.torch import load_file, save_file
    from transformers.core_model_loading import revert_weight_conversion

    if not isinstance(heads.variant, MtpVariant):
        raise ValueError(f"export_mtp: the heads are {heads.architecture!r} heads; only 'mtp' heads have a native "
                         "layout")
    if is_quantized(model):
        raise ValueError("export_mtp: the model's weights are quantized; load it unquantized with its adapters and "
                         "merge")
    base = causal_lm_of(model)
    if base is not model and is_peft_model(model):
        base = copy.deepcopy(model).merge_and_unload()
    if not _keeps_mtp_after_layers(base) or heads.shared_post_norm is not None:
        raise NotImplementedError(f"export_mtp: {type(base).__name__} keeps its MTP layers in a layout other than "
                                  "DeepSeek-V3's extra decoder layers; only that layout is written")
    path = Path(path)
    first = base.config.get_text_config().num_hidden_layers
    prefix = _layers_prefix(base)
    extra: dict[str, Tensor] = {}
    for k, layer in enumerate(heads.blocks):
        layer_prefix = f"{prefix}{first + k}."
        block = {layer_prefix + name: t for name, t in layer.mtp_block.state_dict().items()}
        extra.update(revert_weight_conversion(base, block))
        for name in ("enorm", "hnorm", "eh_proj"):
            for leaf, t in getattr(layer, name).state_dict().items():
                extra[f"{layer_prefix}{name}.{leaf}"] = t
        for leaf, t in layer.post_norm.state_dict().items():
            extra[f"{layer_prefix}shared_head.norm.{leaf}"] = t
        if include_shared:
            extra[f"{layer_prefix}embed_tokens.weight"] = base.get_input_embeddings().weight
            extra[f"{layer_prefix}shared_head.head.weight"] = base.get_output_embeddings().weight
    extra = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in extra.items()}

    config = base.config.get_text_config()
    depths_before = getattr(config, "num_mtp_layers", None)
    config.num_mtp_layers = heads.num_heads
    try:
        base.save_pretrained(path, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    finally:
        config.num_mtp_layers = depths_before
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    index_file = path / SAFE_WEIGHTS_INDEX
    if index_file.is_file():
        save_file(extra, str(path / MTP_SHARD), metadata={"format": "pt"})
        index = json.loads(index_file.read_text())
        index["weight_map"].update({name: MTP_SHARD for name in extra})
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
    else:
        weights = load_file(str(path / SAFE_WEIGHTS))
        save_file({**weights, **extra}, str(path / SAFE_WEIGHTS), metadata={"format": "pt"})
    _check_export(base, heads, path)
    return path


def _check_export(base: nn.Module, heads: MultiTokenHeads, path: Path) -> None:
    """Read the written MTP layers back through transformers and compare them with ``heads``, weight by weight."""
    layers = read_checkpoint_layers(base, path, heads.num_heads)
    written, expected = layers.state_dict(), heads.blocks.state_dict()
    for name, tensor in expected.items():
        if name not in written or not torch.equal(written[name].to(tensor), tensor):
            raise RuntimeError(f"export_mtp: {path} does not give back the heads' {name} through transformers' "
                               "MtpModel")
