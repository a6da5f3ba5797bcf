"""Parallel thought sampling: one thought after every position of a batch, all positions at once.

Pass 0 reads the text. Every later pass is one forward over all ``L`` positions: ``<sot>``, the sampled
thought tokens, ``<eot>``, then the true next tokens (teacher forcing of the talk steps). At pass ``k`` the
query at position ``i`` attends to the text keys ``j <= i`` and to the keys passes ``1..k`` wrote at position
``i`` itself, so branch ``i`` sees exactly the prefix ``x_<=i`` and its own thought: the same computation as
running the model on ``x_<=i, <sot>, t_1, ..., <eot>, x_i+1, ...`` as one sequence. Position ids advance by
one per pass (thought token ``k`` of branch ``i`` sits at position ``i + k``).

The text pass runs once on ``B`` rows; its keys and values are held once (see :mod:`.attention`) and read by
the ``n_thoughts`` thoughts of each row (``B * n`` rows after it, thought ``k`` of row ``b`` at row
``b * n + k``), and each later pass adds only its own ``L`` keys per row, so memory grows with the pass count,
not its square.

Pass count for ``thought_length`` sampled tokens and ``n_ahead_talk`` talk steps:
``1 + 1 + thought_length + 1 + (n_ahead_talk - 1) = thought_length + n_ahead_talk + 2``, the reference's
``n_ahead + n_ahead_talk - 1`` with ``n_ahead = thought_length + 3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lightning_tokens.data.packing import segment_ids
from lightning_tokens.modeling import decoder_of
from lightning_tokens.thoughts.attention import DEFAULT_QUERY_CHUNK, ThoughtPassState, thought_attention_mode
from lightning_tokens.thoughts.positions import ThinkAt, ThoughtPositions, choose_positions, next_token_entropy


@dataclass
class ThoughtPasses:
    """Hidden states of one parallel thought forward (``n`` = thoughts per row, ``d`` = hidden size, ``P`` = thought
    positions per row: ``L``, or the number chosen by ``think_at``).

    Attributes:
        base_hidden: ``(B, L, d)`` final hidden states of the text pass (position ``i`` predicts ``x_i+1``).
        thought_hidden: ``thought_length`` tensors ``(B * n, P, d)``: the states thought token ``k`` was
            sampled from (after ``<sot>``, ``t_1``, ...).
        thought_tokens: ``(B * n, P, thought_length)`` sampled thought tokens (detached).
        talk_hidden: ``n_ahead_talk`` tensors ``(B * n, P, d)``: talk step ``s`` at position ``i`` predicts
            ``x_i+1+s`` after the thought (step 0 follows ``<eot>``, step ``s`` has read ``x_i+1..x_i+s``).
        attention_mask: ``(B, L)`` the batch's padding mask: only branches at real positions are thoughts.
            Default ``None``: no padding.
        segments: ``(B, L)`` sample number of each position of a packed batch, or ``None``: a talk step then
            never predicts a token of the next sample. Default ``None``.
        positions: The positions thought at (slot ``p`` of every ``(B * n, P)`` tensor is position
            ``positions.index[b, p]``), or ``None``: every position, slot ``i`` being position ``i``. Default ``None``.
    """

    base_hidden: Tensor
    thought_hidden: list[Tensor]
    thought_tokens: Tensor
    talk_hidden: list[Tensor]
    attention_mask: Optional[Tensor] = None
    segments: Optional[Tensor] = None
    positions: Optional[ThoughtPositions] = None


def check_supported(lm: PreTrainedModel) -> None:
    """Raise a clear error for settings the thought passes cannot run under."""
    implementation = getattr(lm.config, "_attn_implementation", None)
    if implementation is not None and "flash" in implementation:
        raise ValueError(f"Quiet-STaR: attn_implementation {implementation!r} cannot take the 4D thought mask; "
                         "use ModelSpec.attn_implementation 'sdpa' or 'eager'")
    checkpointing = getattr(type(lm), "is_activation_checkpointing", None) or getattr(type(lm), "is_gradient_checkpointing", None)
    if checkpointing is not None and checkpointing.fget(lm):
        raise ValueError("Quiet-STaR: gradient checkpointing re-runs each layer in the backward, outside the "
                         "thought passes whose keys it needs; set ModelSpec.gradient_checkpointing to false")


def positions_of(attention_mask: Tensor) -> Tensor:
    """``(B, L)`` position ids that skip left padding (0 at each row's first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def text_mask(attention_mask: Tensor, sliding_window: Optional[int] = None, segments: Optional[Tensor] = None) -> Tensor:
    """``(B, L, L)`` bool: query ``i`` may read key ``j`` (causal, real keys of its own sample when ``segments``
    number the samples of packed rows; always itself, so no row is empty)."""
    length = attention_mask.shape[-1]
    index = torch.arange(length, device=attention_mask.device)
    allowed = (index[None, :] <= index[:, None])[None] & attention_mask.bool()[:, None, :]
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    if sliding_window is not None:
        allowed &= (index[:, None] - index[None, :] < sliding_window)[None]
    return allowed | torch.eye(length, dtype=torch.bool, device=attention_mask.device)[None]


def sliding_window(lm: PreTrainedModel, length: int) -> Optional[int]:
    """The model's sliding attention window where it is on and shorter than ``length``, else ``None``."""
    window = getattr(lm.config, "sliding_window", None)
    if window is None or getattr(lm.config, "use_sliding_window", True) is False:
        return None
    return window if length > window else None


def sample_tokens(logits: Tensor, temperature: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """An exact sample from ``softmax(logits / temperature)`` (Gumbel-max), or the argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return (logits.float() / temperature + gumbel).argmax(-1)


def forbid(logits: Tensor, token_ids: Tensor) -> Tensor:
    """``logits`` with the given vocabulary entries at ``-inf`` (a copy; the input is left alone)."""
    return logits.index_fill(-1, token_ids, float("-inf"))


def parallel_thoughts(
    lm: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    start_embedding: Tensor,
    end_embedding: Tensor,
    forbidden_ids: Tensor,
    n_thoughts: int,
    thought_length: int,
    n_ahead_talk: int,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    generator: Optional[torch.Generator] = None,
    position_ids: Optional[Tensor] = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    think_at: ThinkAt = "all",
    candidates: Optional[Tensor] = None,
) -> ThoughtPasses:
    """Run the text pass and every thought and talk pass of Quiet-STaR for all positions at once.

    Args:
        lm: The transformers causal LM (a PEFT model's inner model; LoRA layers stay active).
        input_ids: ``(B, L)`` token ids.
        attention_mask: ``(B, L)`` 1 on real tokens.
        start_embedding: ``(d,)`` embedding fed as ``<sot>``.
        end_embedding: ``(d,)`` embedding fed as ``<eot>``.
        forbidden_ids: Token ids never sampled inside a thought (the start and end tokens).
        n_thoughts: Thoughts per position.
        thought_length: Sampled tokens per thought, between ``<sot>`` and ``<eot>``.
        n_ahead_talk: Talk steps (true tokens predicted after each thought).
        temperature: Sampling temperature of thought tokens; 0 takes the argmax. Default ``1.0``.
        pad_token_id: Id fed where a talk step runs past the end of a row. Default ``0``.
        generator: Random generator of the samples. Default ``None`` (the global one).
        position_ids: ``(B, L)`` position ids of a packed batch (restarting at every sample, see
            :mod:`lightning_tokens.data.packing`): every branch then reads its own sample alone. Default
            ``None``: positions from ``attention_mask``, one sample per row.
        query_chunk: Queries per chunk of the passes' attention scores (see :mod:`.attention`). Default
            :data:`~lightning_tokens.thoughts.attention.DEFAULT_QUERY_CHUNK`.
        think_at: Where to think (see :mod:`.positions`): ``"all"`` positions, or per row the ``int`` number or
            ``float`` share of ``candidates`` with the highest next-token entropy of the text pass. Default ``"all"``.
        candidates: ``(B, L)`` bool positions ``think_at`` may choose. Default ``None``: every real position.
    """
    check_supported(lm)
    backbone, head, embed = decoder_of(lm), lm.get_output_embeddings(), lm.get_input_embeddings()
    batch, length = input_ids.shape
    n = n_thoughts
    segments = None if position_ids is None else segment_ids(position_ids)
    positions = positions_of(attention_mask) if position_ids is None else position_ids
    allowed = text_mask(attention_mask, sliding_window(lm, length), segments)
    embeds = embed(input_ids)
    dtype = embeds.dtype
    state = ThoughtPassState(allowed, query_chunk, capacity=thought_length + n_ahead_talk + 1)
    chosen: Optional[ThoughtPositions] = None
    branch_positions = positions

    def step(inputs: Tensor, pass_index: int) -> Tensor:
        """Pass ``pass_index``: the text (0, ``B`` rows) or a thought or talk pass at positions ``i + k``."""
        state.pass_index = pass_index
        position_ids = positions if pass_index == 0 else branch_positions.repeat_interleave(n, 0) + pass_index
        return backbone(inputs_embeds=inputs, position_ids=position_ids, use_cache=False).last_hidden_state

    rows = batch * n
    thought_hidden: list[Tensor] = []
    tokens: list[Tensor] = []
    with thought_attention_mode(lm, state):
        base_hidden = step(embeds, 0)
        if think_at != "all":
            entropy = next_token_entropy(head, base_hidden, forbidden_ids)
            chosen = choose_positions(entropy, attention_mask.bool() if candidates is None else candidates, think_at)
            branch_positions = chosen.take(positions)
            state.query_allowed = chosen.take(allowed)
        slots = length if chosen is None else chosen.index.shape[1]
        inputs = start_embedding.to(dtype).expand(rows, slots, -1)
        for pass_index in range(1, thought_length + 2):
            hidden = step(inputs, pass_index)
            if pass_index > thought_length:
                break  # the last sampled token is read; <eot> comes next
            thought_hidden.append(hidden)
            with torch.no_grad():
                token = sample_tokens(forbid(head(hidden), forbidden_ids), temperature, generator)
            tokens.append(token)
            inputs = embed(token)
        pass_index = thought_length + 2
        talk_hidden = [step(end_embedding.to(dtype).expand(rows, slots, -1), pass_index)]
        for shift in range(1, n_ahead_talk):
            if chosen is None:
                shifted = torch.nn.functional.pad(input_ids[:, shift:], (0, shift), value=pad_token_id)
            else:
                shifted = chosen.take(input_ids, shift, pad_token_id)
            talk_hidden.append(step(embed(shifted.repeat_interleave(n, 0)), pass_index + shift))
    thought_tokens = torch.stack(tokens, -1) if tokens else input_ids.new_zeros(rows, slots, 0)
    return ThoughtPasses(base_hidden, thought_hidden, thought_tokens, talk_hidden, attention_mask, segments, chosen)
