"""Load a causal language model and its tokenizer: hub name, local path or a tiny config.

Everything a YAML can say about the model lives in :class:`ModelSpec`; :func:`load_causal_lm` turns it
into a ``(model, tokenizer)`` pair, with LoRA (PEFT) and bitsandbytes quantization applied on request.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lightning_tokens.checks import check_numbers
from lightning_tokens.quantization import bnb_config, from_pretrained_quantized

Quantization = Literal["nf4", "fp4", "int8"]

#: Sizes used for a tiny model when its config dict names only ``model_type`` (a few million weights).
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    "mistral": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                    sliding_window=None),
    # no SDPA in transformers' Gemma 2: it runs eager attention (see ModelSpec.attn_implementation)
    "gemma2": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=1024),
    "gpt2": dict(n_embd=128, n_layer=4, n_head=4, n_positions=1024),
    # mixture-of-experts models whose checkpoints carry multi-token-prediction layers (num_mtp_layers)
    "deepseek_v3": dict(hidden_size=128, intermediate_size=352, moe_intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, num_mtp_layers=1,
                        max_position_embeddings=1024),
    "glm4_moe": dict(hidden_size=128, intermediate_size=352, moe_intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_routed_experts=8,
                     num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, num_mtp_layers=1,
                     max_position_embeddings=1024),
}


@dataclass
class ModelSpec:
    """What model to load and how to wrap it.

    Exactly one of ``name_or_path`` and ``config`` is set: a hub name or local directory of a pretrained
    causal LM, or a dict of a tiny model's config built from scratch (``{"model_type": "llama", ...}``;
    missing sizes come from :data:`TINY_DEFAULTS`, the vocabulary and special ids from the tokenizer).

    Attributes:
        name_or_path: Hub name or local path of a pretrained causal LM. Default ``None``.
        config: Config dict of a tiny model built from scratch. Default ``None``; when both this and
            ``name_or_path`` are ``None``, a tiny Llama is built.
        tokenizer: Hub name or path of the tokenizer. Default ``None``: ``name_or_path``'s tokenizer, or the
            project's embedded reasoning-task tokenizer for a tiny model.
        lora: Fields of ``peft.LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``...).
            Default ``None``: no LoRA, every weight trains. ``target_modules`` defaults to ``"all-linear"``.
        quantization: ``"nf4"``, ``"fp4"`` (4-bit) or ``"int8"`` base weights through bitsandbytes, followed
            by PEFT's ``prepare_model_for_kbit_training``. Default ``None``. Needs ``lora`` to train.
        double_quant: Quantize the 4-bit quantization constants too (QLoRA's double quantization).
            Default ``True``.
        compute_dtype: Dtype of the 4-bit matmuls. Default ``"auto"``: bfloat16 on a CUDA device that
            supports it, else float32.
        dtype: Dtype of unquantized weights. Default ``"float32"``; ``"bfloat16"`` halves memory on GPUs.
        attn_implementation: The attention kernel: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``,
            ``"flex_attention"``... Default ``None``: SDPA where the model supports it, else the model's own default
            (eager for Gemma 2, say), logged once per model type. A kernel the model does not support raises a
            ``ValueError`` naming those it does.
        gradient_checkpointing: Recompute activations in backward (non-reentrant). Default ``False``.
        seed: Seed of a tiny model's random initialisation. Default ``0``.
        trust_remote_code: Passed to ``from_pretrained``. Default ``False``.
    """

    name_or_path: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    tokenizer: Optional[str] = None
    lora: Optional[dict[str, Any]] = None
    quantization: Optional[Quantization] = None
    double_quant: bool = True
    compute_dtype: str = "auto"
    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    seed: int = 0
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for ``from_pretrained``. Default ``{}``."""

    def __post_init__(self) -> None:
        if self.name_or_path is not None and self.config is not None:
            raise ValueError("ModelSpec: set either 'name_or_path' or 'config', not both")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("ModelSpec.config needs a 'model_type' key (e.g. 'llama', 'qwen2', 'gpt2')")
        if self.quantization not in (None, "nf4", "fp4", "int8"):
            raise ValueError(f"ModelSpec.quantization must be 'nf4', 'fp4', 'int8' or null, got {self.quantization!r}")
        _dtype(self.dtype, "dtype")
        if self.attn_implementation is not None and not isinstance(self.attn_implementation, str):
            raise ValueError(f"ModelSpec.attn_implementation must be a string or null (automatic), "
                             f"got {self.attn_implementation!r}")
        check_numbers("ModelSpec", seed=(self.seed, "an integer"))


# Checkpoints keep the spec in their hyperparameters; this lets torch.load(weights_only=True) read them.
torch.serialization.add_safe_globals([ModelSpec])


def _dtype(name: str, field_name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"ModelSpec.{field_name}: {name!r} is not a torch dtype (try 'float32' or 'bfloat16')")
    return value


def resolve_compute_dtype(name: str) -> torch.dtype:
    """The dtype for 4-bit matmuls: ``name``, or for ``"auto"`` bfloat16 where CUDA supports it, else float32."""
    if name != "auto":
        return _dtype(name, "compute_dtype")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of ``spec``: its own, the hub model's, or the embedded task tokenizer for tiny models."""
    name = spec.tokenizer or spec.name_or_path
    if name is None:
        from lightning_tokens.data.tokenizer import load_task_tokenizer

        return load_task_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase):
    """A transformers config from a small dict: defaults per model type, vocabulary from the tokenizer."""
    config = dict(config)
    model_type = config.pop("model_type")
    if model_type not in TINY_DEFAULTS:
        known = ", ".join(sorted(TINY_DEFAULTS))
        # Other architectures still work when the dict gives every size they need.
        if not any(k in config for k in ("hidden_size", "n_embd", "d_model")):
            raise ValueError(f"ModelSpec.config: no tiny defaults for model_type {model_type!r} (known: {known}); "
                             "give its sizes explicitly")
    values = {**TINY_DEFAULTS.get(model_type, {}), **config}
    values.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        values.setdefault(name, getattr(tokenizer, name))
    return AutoConfig.for_model(model_type, **values)


def _quantization_config(spec: ModelSpec):
    return bnb_config(spec.quantization, resolve_compute_dtype(spec.compute_dtype), spec.double_quant)


def _device_map() -> dict[str, Any]:
    # Quantized weights are placed at load time; under DDP each process takes its own GPU.
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


_FLASH = re.compile(r"flash_attention_\d+")
#: Options a hub model's config is read with, when they are among ``ModelSpec.extra``.
_CONFIG_OPTIONS = ("revision", "token", "cache_dir", "subfolder", "local_files_only")


def supported_attention(model_class: type) -> Optional[tuple[str, ...]]:
    """The attention implementations a transformers model class declares (``"eager"``, ``"sdpa"``,
    ``"flash_attention_2"``...), or ``None`` where it declares nothing (custom code)."""
    if getattr(model_class, "_supports_sdpa", None) is None:
        return None
    names = ["eager"] + (["sdpa"] if model_class._supports_sdpa else [])
    if getattr(model_class, "_supports_flash_attn", False):
        names += sorted(name for name in ALL_ATTENTION_FUNCTIONS if _FLASH.fullmatch(name))
    if getattr(model_class, "_supports_flex_attn", False):
        names.append("flex_attention")
    return tuple(names)


def _causal_lm_class(config: Any) -> Optional[type]:
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (AttributeError, KeyError, ValueError):  # custom code, or not a causal LM: transformers will say
        return None


def check_attn_implementation(requested: str, config: Any) -> None:
    """Refuse an ``attn_implementation`` the causal LM of ``config`` does not support.

    Implementations transformers knows but a model does not declare (``"sdpa"`` on Gemma 2, flash attention on
    GPT-2) and names nobody registered raise here, before anything is built; custom attention functions
    registered in transformers' ``AttentionInterface`` and hub kernels (``"org/repo"``) go through.

    Args:
        requested: The ``attn_implementation`` asked for.
        config: The model's transformers config.

    Raises:
        ValueError: The model does not support ``requested``; names the model type and what it supports.
    """
    model_class = _causal_lm_class(config)
    supported = None if model_class is None else supported_attention(model_class)
    if supported is None or requested in supported:
        return
    standard = requested in ("eager", "sdpa", "flex_attention") or _FLASH.fullmatch(requested)
    if not standard and (requested in ALL_ATTENTION_FUNCTIONS or "/" in requested or "|" in requested):
        return
    listed = ", ".join(repr(name) for name in supported)
    raise ValueError(f"ModelSpec.attn_implementation {requested!r}: {model_class.__name__} (model type "
                     f"{config.model_type!r}) supports {listed}; or leave it null to pick one automatically")


_reported_attention: set[tuple[str, str, Optional[str]]] = set()


def _report_attention(model: PreTrainedModel, requested: Optional[str]) -> None:
    """Log once per model type which attention implementation it runs, and why."""
    used = str(model.config._attn_implementation)
    key = (str(model.config.model_type), used, requested)
    if key in _reported_attention:
        return
    _reported_attention.add(key)
    if requested is not None:
        why = "as requested"
    elif used == "sdpa":
        why = "chosen automatically"
    else:
        why = f"chosen automatically: {type(model).__name__} does not support 'sdpa'"
    rank_zero_info(f"ModelSpec: model type {key[0]!r} runs attn_implementation {used!r} ({why})")


def _build_base(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    if spec.attn_implementation is not None and spec.name_or_path is not None:
        options = {name: spec.extra[name] for name in _CONFIG_OPTIONS if name in spec.extra}
        check_attn_implementation(spec.attn_implementation, AutoConfig.from_pretrained(
            spec.name_or_path, trust_remote_code=spec.trust_remote_code, **options))
    model = _build_base_model(spec, tokenizer)
    _report_attention(model, spec.attn_implementation)
    return model


def _build_base_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    kwargs: dict[str, Any] = dict(attn_implementation=spec.attn_implementation, dtype=_dtype(spec.dtype, "dtype"))
    if spec.name_or_path is not None:
        kwargs.update(trust_remote_code=spec.trust_remote_code, **spec.extra)
        if spec.quantization:
            return from_pretrained_quantized(spec.name_or_path, _quantization_config(spec), device_map=_device_map(),
                                             **kwargs)
        return AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs)
    config = tiny_config(spec.config or {"model_type": "llama"}, tokenizer)
    if spec.attn_implementation is not None:
        check_attn_implementation(spec.attn_implementation, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if not spec.quantization:
        return model
    # bitsandbytes quantizes while loading weights, so a tiny model goes through a temporary save.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model = from_pretrained_quantized(tmp, _quantization_config(spec), device_map=_device_map(), **kwargs)
    # Not the deleted temporary folder: like any model built from a config, it has no source to name.
    model.name_or_path = model.config._name_or_path = ""
    return model


def apply_lora(model: PreTrainedModel, lora: dict[str, Any]) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model from a dict of ``LoraConfig`` fields."""
    from peft import LoraConfig, get_peft_model

    fields = {"target_modules": "all-linear", "task_type": "CAUSAL_LM", **lora}
    try:
        config = LoraConfig(**fields)
    except TypeError as error:
        raise ValueError(f"ModelSpec.lora: {error}") from None
    return get_peft_model(model, config)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation (gradient) checkpointing of every decoder layer of ``model``.

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns and goes in v6); the new one is called where it exists.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_causal_lm(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load or build the causal LM of ``spec`` and its tokenizer.

    Args:
        spec: What to load (see :class:`ModelSpec`).

    Returns:
        ``(model, tokenizer)``; ``model`` is a ``PeftModel`` when ``spec.lora`` is set, else the transformers
        model itself.
    """
    if spec.attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        raise ValueError("ModelSpec.attn_implementation 'flash_attention_2' needs a CUDA device; leave it null "
                         "(automatic) or use 'sdpa' or 'eager'")
    tokenizer = load_tokenizer(spec)
    model = _build_base(spec, tokenizer)
    if spec.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if spec.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    elif spec.quantization:
        raise ValueError("ModelSpec.quantization: quantized base weights cannot train; add a 'lora' section")
    # from_pretrained returns eval mode (from_config train mode) and Lightning keeps submodule modes: without
    # this, hub and quantized models would train without dropout and unseen by the token-loss dispatcher.
    model.train()
    return model, tokenizer


def load_frozen_causal_lm(spec: ModelSpec) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model of ``spec`` for inference only: every weight frozen, eval mode.

    Unlike :func:`load_causal_lm`, a quantized base needs no ``lora`` section here (nothing trains). Used for
    reference and frozen models (Rho-1's reference, budget guidance's LM).
    """
    if spec.lora is not None:
        model, tokenizer = load_causal_lm(spec)
    else:
        tokenizer = load_tokenizer(spec)
        model = _build_base(spec, tokenizer)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def base_reference(spec: ModelSpec) -> Optional[str]:
    """How a saved adapter names the base of ``spec``: its hub name, its local directory as an absolute path
    (an adapter is loaded from anywhere), or ``None`` for a model built from a config (nothing to name)."""
    if spec.name_or_path is None:
        return None
    local = Path(spec.name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else spec.name_or_path


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or the base model of a PEFT wrapper)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise ValueError(f"no Hugging Face causal LM found inside {type(model).__name__}")


def find_causal_lm(pl_module: nn.Module, attribute: Optional[str] = None) -> nn.Module:
    """The transformers causal LM a LightningModule trains.

    Args:
        pl_module: The LightningModule.
        attribute: Dotted attribute path to the model inside ``pl_module`` (``"model"``, ``"net.lm"``).
            Default ``None``: the module's only Hugging Face causal LM, or, when it holds several (a frozen
            teacher beside the student, say), the only one with trainable parameters.

    Raises:
        ValueError: No causal LM, or several and not exactly one of them trainable: the message lists them
            by attribute path, to pass one as ``model_attribute``.
    """
    if attribute is not None:
        target: Any = pl_module
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise AttributeError(f"{type(pl_module).__name__} has no attribute path {attribute!r} (at {part!r})")
            target = getattr(target, part)
        return causal_lm_of(target)
    candidates = _causal_lms(pl_module)
    if len(candidates) == 1:
        return candidates[0][1]
    if not candidates:
        raise ValueError(f"no Hugging Face causal LM found inside {type(pl_module).__name__}")
    trainable = [model for _, model in candidates if any(p.requires_grad for p in model.parameters())]
    if len(trainable) == 1:
        return trainable[0]
    listing = ", ".join(f"{path!r} ({'trainable' if model in trainable else 'frozen'})" for path, model in candidates)
    raise ValueError(f"{type(pl_module).__name__} holds {len(candidates)} causal LMs: {listing}, and "
                     f"{'none' if not trainable else len(trainable)} of them trainable, so which one trains is "
                     "ambiguous; name it with the callback's model_attribute (e.g. model_attribute="
                     f"{candidates[0][0]!r})")


def _causal_lms(pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every outermost Hugging Face causal LM in ``pl_module``, by the shortest attribute path that reaches it."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in pl_module.named_modules():
        if not isinstance(module, PreTrainedModel) or module.get_output_embeddings() is None:
            continue
        if any(m is module or name.startswith(path + ".") for path, m in found):
            continue
        parts = name.split(".")
        # A PEFT wrapper hides the model at ``<attr>.base_model.model``: name the attribute the user set.
        path = next(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                    if causal_lm_of(pl_module.get_submodule(".".join(parts[:i]))) is module)
        found.append((path, module))
    return found


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes-quantized weights."""
    return bool(getattr(causal_lm_of(model), "is_quantized", False))


def peft_model_of(model: nn.Module) -> Optional[nn.Module]:
    """The PEFT wrapper (a ``peft.PeftModel``, e.g. from :func:`apply_lora`) in ``model``, else ``None``.

    Args:
        model: A causal LM, plain or PEFT-wrapped, or a module holding one (a LightningModule): the first
            ``PeftModel`` among ``model`` and its submodules is returned.
    """
    from peft import PeftModel

    return next((module for module in model.modules() if isinstance(module, PeftModel)), None)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is or holds a PEFT wrapper (see :func:`peft_model_of`).

    Args:
        model: A causal LM, plain or PEFT-wrapped, or a module holding one.
    """
    return peft_model_of(model) is not None


def inference_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for a forward or ``generate()`` of ``model`` that only infers: ``output_router_logits=False``
    where its config asks for router logits (a mixture-of-experts model set up for training), else none.

    The router load-balancing loss is a training term. Computed while decoding with a cache it fails: transformers'
    ``load_balancing_loss_func`` weighs the new tokens' router logits with the whole attention mask.

    Args:
        model: The causal LM, plain or wrapped (PEFT, a LightningModule's attribute).
    """
    return {"output_router_logits": False} if collects_router_logits(model) else {}


def collects_router_logits(model: nn.Module) -> bool:
    """Whether ``model``'s config asks its forwards for router logits (a mixture-of-experts model set up to train with
    its load-balancing loss, ``output_router_logits``); ``model`` plain or wrapped."""
    return bool(getattr(causal_lm_of(model).config.get_text_config(), "output_router_logits", False))


def has_position_bias(attention_mask: Any) -> bool:
    """Whether an additive attention mask holds anything but 0 and large negatives: a position bias added to it
    (ALiBi, as Falcon adds it), which code building its own mask would leave out. Bool masks and ``None`` hold none."""
    if not isinstance(attention_mask, torch.Tensor) or not attention_mask.is_floating_point():
        return False
    hidden = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    return bool((attention_mask.masked_fill(hidden, 0) != 0).any())


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``, ``GPT2Model``, ...) inside a causal LM, PEFT-wrapped or not.

    Called alone it returns the final hidden states, without the output head.
    """
    base = causal_lm_of(model)
    if hasattr(base, "get_decoder"):
        try:
            return base.get_decoder()
        except (AttributeError, NotImplementedError):
            pass
    return getattr(base, base.base_model_prefix)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of any standard transformers causal LM (llama, qwen2, mistral, gpt2, ...)."""
    base = causal_lm_of(model)
    inner = decoder_of(base)
    for name in ("layers", "h", "blocks", "layer"):
        layers = getattr(inner, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")


#: Names a transformers forward has taken its KV cache under, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_keyword(module: nn.Module) -> str:
    """The keyword under which ``module``'s forward takes its KV cache (``Cache``).

    transformers 5.24 renamed ``past_key_values`` to ``cache`` in the forwards of models, decoder layers and
    attention modules (the old name still works there, with a FutureWarning, until 5.40). Reading the
    signature serves every version and architecture without a version switch.
    """
    return _cache_keyword(type(module))


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:
    parameters = inspect.signature(cls.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), "past_key_values")
