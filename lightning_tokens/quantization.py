"""bitsandbytes base weights: the quantization config and the one way this package loads quantized models.

Every quantized model the package makes (the trained model, frozen history and reference copies, the frozen
LM of budget guidance) comes from :func:`from_pretrained_quantized`, which pins bitsandbytes' 4-bit layers to
the path that trains correctly on every CPU (:func:`keep_4bit_weights_unpacked`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel


def bnb_config(quantization: str, compute_dtype: torch.dtype, double_quant: bool = True):
    """A transformers ``BitsAndBytesConfig``.

    Args:
        quantization: ``"int8"``, ``"nf4"`` or ``"fp4"``. No default.
        compute_dtype: Dtype of the 4-bit matmuls. No default.
        double_quant: Quantize the 4-bit quantization constants too. Default ``True``.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)


def keep_4bit_weights_unpacked(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` off the CPU weight-repacking path; CUDA is unaffected.

    bitsandbytes 0.50 gives each ``Linear4bit`` a ``support_avx512bf16_for_cpu`` flag, true on CPUs with
    AVX512-BF16 (current EPYC and Xeon parts). With it set, a forward on CPU in eval mode whose input needs no
    gradient (validation, a ``no_grad`` history or generation forward) rewrites the layer's
    weight in place into a layout for an AVX512-BF16 kernel, and the layer never goes back:

    - the rewrite needs ``in_features % 64 == 0`` and ``out_features % 32 == 0`` and raises otherwise;
    - later training forwards run the packed kernel (``gemv_4bit``), which has no autograd: no gradient
      reaches the layer's input, so every LoRA adapter below it trains on a wrong gradient, silently;
    - ``state_dict()`` converts back lossily (double-quantized scales are re-quantized; without double
      quantization the scales come back in the wrong order), so a checkpoint no longer holds the weights.

    Clearing the flag keeps the portable 4-bit kernels, which are exact for training, validation and saving
    on every CPU. The flag is read only when the input is on the CPU, so nothing changes on CUDA.

    Args:
        model: Any module; its ``bitsandbytes.nn.Linear4bit`` submodules (inside PEFT wrappers too) are changed.

    Returns:
        The number of 4-bit layers found.

    Raises:
        ValueError: A layer was already repacked (the model ran such a forward before it reached this
            package); its weights cannot be restored exactly, so it must be loaded again.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # bitsandbytes is a dependency, but a model without 4-bit layers needs none of it
        return 0
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, layer in layers:
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise ValueError(
                f"4-bit layer {name!r} was already repacked by bitsandbytes for its AVX512-BF16 CPU kernel (an "
                "eval-mode forward under no_grad ran on the CPU before this package saw the model); its weights "
                "cannot be restored exactly. Load the model again and pass it on before any such forward, or call "
                "lightning_tokens.keep_4bit_weights_unpacked(model) right after loading it.")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def from_pretrained_quantized(name_or_path: str, quantization_config: Any, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with a bitsandbytes config, 4-bit layers kept unpacked.

    Args:
        name_or_path: Hub name or local directory. No default.
        quantization_config: A ``BitsAndBytesConfig`` (see :func:`bnb_config`). No default.
        **kwargs: Further ``from_pretrained`` arguments (``device_map``, ``dtype``, ...).
    """
    model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=quantization_config, **kwargs)
    keep_4bit_weights_unpacked(model)
    return model


def restore_4bit_quant_states(module: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> int:
    """Give ``module``'s 4-bit layers the quantization statistics saved in ``state_dict``, before loading it.

    bitsandbytes writes each ``Linear4bit``'s statistics (``absmax``, ``quant_map``, ``nested_*``,
    ``quant_state.bitsandbytes__*``) as extra entries next to its ``weight``, but only transformers'
    ``from_pretrained`` reads them back: ``load_state_dict`` rejects them as unexpected keys, so a QLoRA
    checkpoint would neither resume nor load. This moves them out of ``state_dict`` into each layer (a
    :class:`bitsandbytes.nn.Params4bit` rebuilt from the saved weight and statistics, bit for bit); the weight
    entry stays, so strict loading then goes through.

    Args:
        module: The module the state dict belongs to.
        state_dict: Its state dict (changed in place: the statistics entries are removed).
        prefix: Prefix of ``module``'s keys in ``state_dict``. Default ``""``.

    Returns:
        The number of layers restored.
    """
    try:
        from bitsandbytes.nn import Linear4bit, Params4bit
    except ImportError:
        return 0
    restored = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, Linear4bit):
            continue
        weight_key = f"{prefix}{name}.weight"
        stats_keys = [key for key in state_dict if key.startswith(weight_key + ".")]
        if weight_key not in state_dict or not stats_keys:
            continue
        stats = {key[len(weight_key) + 1:]: state_dict.pop(key) for key in stats_keys}
        layer.weight = Params4bit.from_prequantized(state_dict[weight_key], stats, requires_grad=False,
                                                    device=layer.weight.device, module=layer)
        restored += keep_4bit_weights_unpacked(layer)
    return restored
