"""Thoughtful generation: think before every emitted token, on the KV cache, and leave no trace of it.

For each new token: the text's last hidden state ``h_base`` is at hand; ``<sot>``, ``thought_length``
thought tokens and ``<eot>`` are decoded on the cache (positions advancing as in training), the state after
``<eot>`` is mixed with ``h_base`` by the mixing head, the token is chosen from the mixed logits, the cache
is cropped back to the text, and the token is read as text. Per token this costs ``thought_length + 3``
one-token steps, against the reference's re-run of every thought pass over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from lightning_tokens.modeling import cache_keyword, causal_lm_of, decoder_of
from lightning_tokens.thoughts.heads import MixingHead
from lightning_tokens.thoughts.parallel import check_supported, forbid, positions_of, sample_tokens


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
    """
    lm: PreTrainedModel = causal_lm_of(model)
    check_supported(lm)
    backbone, head, embed = decoder_of(lm), lm.get_output_embeddings(), lm.get_input_embeddings()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = input_ids.shape[0]
    was_training = model.training
    model.eval()
    cache = DynamicCache()
    mask = attention_mask.long()
    positions = positions_of(mask)

    def step(inputs: Tensor, position_ids: Tensor) -> Tensor:
        nonlocal mask
        mask = torch.cat([mask, mask.new_ones(batch, inputs.shape[1])], dim=-1) if cache.get_seq_length() else mask
        out = backbone(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids,
                       use_cache=True, **{cache_keyword(backbone): cache})
        return out.last_hidden_state[:, -1]

    try:
        dtype = embed.weight.dtype
        base = step(embed(input_ids), positions)
        last = positions[:, -1:]
        sot = start_embedding.to(dtype).expand(batch, 1, -1)
        eot = end_embedding.to(dtype).expand(batch, 1, -1)
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        new_tokens, thoughts, weights = [], [], []
        for _ in range(max_new_tokens):
            text_length, text_mask = cache.get_seq_length(), mask
            hidden = step(sot, last + 1)
            thought = []
            for k in range(thought_length):
                token = sample_tokens(forbid(head(hidden), forbidden_ids), thought_temperature, generator)
                thought.append(token)
                hidden = step(embed(token)[:, None], last + 2 + k)
            hidden = step(eot, last + 2 + thought_length)
            mixed, weight = mixing_head(base, hidden)
            token = sample_tokens(forbid(head(mixed), forbidden_ids), temperature, generator)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            cache.crop(text_length - cache.get_seq_length())  # a negative count: remove the thought
            mask = text_mask
            new_tokens.append(token)
            if return_thoughts:
                thoughts.append(torch.stack(thought, -1) if thought else token.new_zeros(batch, 0))
                weights.append(weight.squeeze(-1))
            if eos_token_id is not None:
                done |= token == eos_token_id
            if bool(done.all()):
                break
            last = last + 1
            base = step(embed(token)[:, None], last)
    finally:
        model.train(was_training)
    sequences = torch.cat([input_ids, torch.stack(new_tokens, 1)], dim=1) if new_tokens else input_ids
    if not return_thoughts:
        return ThoughtfulOutput(sequences)
    return ThoughtfulOutput(sequences, torch.stack(thoughts, 1), torch.stack(weights, 1).float())
