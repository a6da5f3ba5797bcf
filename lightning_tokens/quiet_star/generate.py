"""Thoughtful generation: think before every emitted token, on the KV cache, and leave no trace of it.

For each new token: the text's last hidden state ``h_base`` is at hand; ``<sot>``, ``thought_length``
thought tokens and ``<eot>`` are decoded on the cache (positions advancing as in training), the state after
``<eot>`` is mixed with ``h_base`` by the mixing head, the token is chosen from the mixed logits, and the
token is read as text. Per token this costs ``thought_length + 3`` one-token steps, against the reference's
re-run of every thought pass over the whole sequence.

The cache (:class:`SlotCache`) is allocated once, for the prompt, every new token and one thought. A forward
writes its keys and values at chosen slots: the thought goes right after the text, and the next text token
is written over the thought's first slot. The thought's other slots are then past every later query until
they are overwritten, and the mask (:func:`slot_mask`) hides slots past the query, so nothing is copied or
cropped. The shapes never change, so the one-token step can run under ``torch.compile`` (CUDA graphs on GPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, StaticLayer

from lightning_tokens.checks import check_numbers
from lightning_tokens.lean_loss import OutputProjection
from lightning_tokens.modeling import cache_keyword, causal_lm_of, decoder_of
from lightning_tokens.quiet_star.mixing import MixingHead
from lightning_tokens.quiet_star.parallel import check_supported, forbid, layer_windows, positions_of, sample_tokens

#: The sliding window of every layer (``None``: full attention), or of each of ``config.layer_types``.
Windows = Union[Optional[int], dict[str, Optional[int]]]


@dataclass
class ThoughtfulOutput:
    """What :func:`thoughtful_generate` returns.

    Attributes:
        sequences: ``(B, T + new)`` prompt and generated ids (``pad_token_id`` after a row's eos).
        thoughts: ``(B, new, thought_length)`` the thought behind each generated token, or ``None``
            unless ``return_thoughts``.
        mixing_weights: ``(B, new)`` the mixing weight of each generated token, or ``None`` unless
            ``return_thoughts``.
    """

    sequences: Tensor
    thoughts: Optional[Tensor] = None
    mixing_weights: Optional[Tensor] = None


class _SlotLayer(StaticLayer):
    """One layer's keys and values, ``(B, heads, max_cache_len, head_dim)``, written at ``slot, slot + 1, ...``.

    Each is allocated from the shape the model writes, so keys and values may differ in heads and head size (DeepSeek
    caches its compressed latent and its rotary key, ``(B, 1, ., kv_lora_rank)`` and ``(B, 1, ., qk_rope_head_dim)``).
    """

    def __init__(self, max_cache_len: int, slot: Tensor, static: bool):
        super().__init__(max_cache_len=max_cache_len)
        self.slot, self.static = slot, static

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:  # the prompt's forward: allocate for the whole generation
            shape = (*key_states.shape[:2], self.max_cache_len)
            self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
            self.values = value_states.new_zeros(*shape, value_states.shape[-1])
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            if self.static and not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay without copies
                torch._dynamo.mark_static_address(self.keys)
                torch._dynamo.mark_static_address(self.values)
        index = self.slot + torch.arange(key_states.shape[-2], device=self.slot.device)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        return self.keys, self.values


class SlotCache(Cache):
    """A pre-allocated KV cache whose next forward writes at ``slot`` (a device scalar set before the forward).

    Args:
        num_layers: Decoder layers.
        max_cache_len: Slots per row.
        device: Device of ``slot``.
        static: Mark the slot and the buffers as static addresses for ``torch.compile``. Default ``False``.
    """

    def __init__(self, num_layers: int, max_cache_len: int, device: torch.device, static: bool = False):
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        if static:
            torch._dynamo.mark_static_address(self.slot)
        super().__init__(layers=[_SlotLayer(max_cache_len, self.slot, static) for _ in range(num_layers)])


def slot_mask(valid: Tensor, slot: Tensor, queries: int, window: Optional[int], dtype: torch.dtype) -> Tensor:
    """``(B, 1, queries, S)`` additive mask of queries at slots ``slot, slot + 1, ...``: each reads the ``valid``
    (``(B, S)`` bool, False on padding) slots up to its own, within ``window`` slots if it is set.

    transformers passes a 4D mask to the attention as it is, whatever the architecture or version (the mask it
    would build itself depends on both), and an additive one serves the eager attention as well as SDPA.
    """
    keys = torch.arange(valid.shape[-1], device=valid.device)
    query = slot + torch.arange(queries, device=valid.device)[:, None]
    allowed = (keys <= query) & valid[:, None, None, :]
    if window is not None:
        allowed &= query - keys < window
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def cache_windows(lm: PreTrainedModel, size: int) -> Windows:
    """The windows :func:`slot_mask` takes for a cache of ``size`` slots: one for every layer, or per layer type where
    the layers' windows differ (the models that list ``config.layer_types`` take a mask per type); a window of
    ``size`` slots or more is none."""
    windows = [None if window is None or window >= size else window for window in layer_windows(lm)]
    if len(set(windows)) == 1:
        return windows[0]
    types = lm.config.get_text_config(decoder=True).layer_types
    return dict(zip(types, windows))


def _forward(backbone: nn.Module, keyword: str, cache: SlotCache, valid: Tensor, windows: Windows,
             inputs: Tensor, position_ids: Tensor) -> Tensor:
    """``inputs`` through ``backbone``, written at ``cache.slot`` onwards: the last position's hidden state."""
    if isinstance(windows, dict):
        mask = {kind: slot_mask(valid, cache.slot, inputs.shape[1], window, inputs.dtype)
                for kind, window in windows.items()}
    else:
        mask = slot_mask(valid, cache.slot, inputs.shape[1], windows, inputs.dtype)
    out = backbone(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids, use_cache=True,
                   **{keyword: cache})
    return out.last_hidden_state[:, -1]


@functools.lru_cache(maxsize=None)
def _compiled(cuda: bool):
    # One compiled function per mode, so later calls reuse its graphs; a second cache size recompiles it once
    # with dynamic shapes, which then serve every size.
    return torch.compile(_forward, mode="reduce-overhead" if cuda else None)


@torch.no_grad()
def thoughtful_generate(
    model: nn.Module,
    mixing_head: MixingHead,
    start_embedding: Tensor,
    end_embedding: Tensor,
    forbidden_ids: Tensor,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    max_new_tokens: int = 32,
    thought_length: int = 9,
    thought_temperature: float = 0.0,
    temperature: float = 0.0,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
    return_thoughts: bool = False,
    generator: Optional[torch.Generator] = None,
    compile: bool = False,
) -> ThoughtfulOutput:
    """Generate with a thought before every token (batch > 1, left-padded prompts).

    Args:
        model: The causal LM (or a wrapper such as a PEFT model).
        mixing_head: The trained mixing head.
        start_embedding: ``(d,)`` the ``<sot>`` embedding.
        end_embedding: ``(d,)`` the ``<eot>`` embedding.
        forbidden_ids: Ids never emitted nor thought (the delimiters).
        input_ids: ``(B, T)`` left-padded prompts.
        attention_mask: ``(B, T)`` their mask. Default ``None``: all ones.
        max_new_tokens: Tokens to generate. Default ``32``.
        thought_length: Sampled tokens per thought (as in training). Default ``9``.
        thought_temperature: Sampling temperature of thought tokens; 0 is greedy. Default ``0.0``
            (the reference evaluates at 0.001, i.e. greedy).
        temperature: Sampling temperature of emitted tokens; 0 is greedy. Default ``0.0``.
        eos_token_id: A row stops after emitting it. Default ``None``.
        pad_token_id: Filler after a row stopped. Default ``0``.
        return_thoughts: Also return each token's thought and mixing weight. Default ``False``.
        generator: Random generator for sampling. Default ``None``.
        compile: Run the one-token steps under ``torch.compile`` (mode ``"reduce-overhead"``, i.e. CUDA
            graphs, on a CUDA device). The first call compiles (tens of seconds), and so does the first call
            with another shape (then with dynamic shapes); later calls reuse the graphs. Meant for GPUs, where
            the small steps are launch-bound. Default ``False``.
    """
    check_numbers("thoughtful_generate", max_new_tokens=(max_new_tokens, "an integer >= 1"),
                  thought_length=(thought_length, "an integer >= 1"), thought_temperature=(thought_temperature, ">= 0"),
                  temperature=(temperature, ">= 0"), eos_token_id=(eos_token_id, "an integer >= 0 or None"),
                  pad_token_id=(pad_token_id, "an integer >= 0"))
    lm: PreTrainedModel = causal_lm_of(model)
    check_supported(lm)
    backbone, head, embed = decoder_of(lm), OutputProjection(lm), lm.get_input_embeddings()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    # The furthest slot is the last token's <eot>: prompt, the earlier new tokens, <sot>, thought, <eot>.
    size = prompt_length + max_new_tokens + thought_length + 1
    cache = SlotCache(lm.config.get_text_config(decoder=True).num_hidden_layers, size, device, static=compile)
    valid = torch.ones(batch, size, dtype=torch.bool, device=device)
    valid[:, :prompt_length] = attention_mask.bool()
    context = (backbone, cache_keyword(backbone), cache, valid, cache_windows(lm, size))
    decode = _compiled(device.type == "cuda") if compile else _forward

    def step(inputs: Tensor, position_ids: Tensor, slot: int) -> Tensor:
        cache.slot.fill_(slot)
        if compile:  # each step replays the same CUDA graph, which overwrites its outputs: they are copied
            torch.compiler.cudagraph_mark_step_begin()
        return decode(*context, inputs, position_ids).clone()

    was_training = model.training
    model.eval()
    try:
        dtype = embed.weight.dtype
        positions = positions_of(attention_mask)
        base = _forward(*context, embed(input_ids), positions)  # the prompt at slot 0, eager: its shape is used once
        last = positions[:, -1:]
        sot = start_embedding.to(dtype).expand(batch, 1, -1).contiguous()
        eot = end_embedding.to(dtype).expand(batch, 1, -1).contiguous()
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens, thoughts, weights = [], [], []
        for i in range(max_new_tokens):
            text = prompt_length + i  # slots 0 .. text - 1 hold the text
            hidden = step(sot, last + 1, text)
            thought = []
            for k in range(thought_length):
                token = sample_tokens(forbid(head(hidden), forbidden_ids), thought_temperature, generator)
                thought.append(token)
                hidden = step(embed(token)[:, None], last + 2 + k, text + 1 + k)
            hidden = step(eot, last + 2 + thought_length, text + 1 + thought_length)
            mixed, weight = mixing_head(base, hidden)
            token = sample_tokens(forbid(head(mixed), forbidden_ids), temperature, generator)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            if return_thoughts:
                thoughts.append(torch.stack(thought, -1) if thought else token.new_zeros(batch, 0))
                weights.append(weight.squeeze(-1))
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                last = last + 1
                base = step(embed(token)[:, None], last, text)  # over <sot>: the thought is gone
    finally:
        model.train(was_training)
    sequences = torch.cat([input_ids, torch.stack(new_tokens, 1)], dim=1) if new_tokens else input_ids
    if not return_thoughts:
        return ThoughtfulOutput(sequences)
    return ThoughtfulOutput(sequences, torch.stack(thoughts, 1), torch.stack(weights, 1).float())
