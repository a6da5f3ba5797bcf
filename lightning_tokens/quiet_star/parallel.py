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

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_tokens.data.packing import segment_ids
from lightning_tokens.lean_loss import HeadInputCapture, OutputProjection, UnsupportedLogits
from lightning_tokens.modeling import collects_router_logits, decoder_layers, decoder_of, has_position_bias
from lightning_tokens.quiet_star.attention import DEFAULT_QUERY_CHUNK, ThoughtPassState, thought_attention_mode
from lightning_tokens.quiet_star.positions import ThinkAt, ThoughtPositions, choose_positions, next_token_entropy


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
        router_logits: Per MoE layer ``(B * L, experts)`` router logits of the text pass, for a mixture-of-experts
            model run with ``output_router_logits`` (the thought passes collect none), else ``None``. Default ``None``.
    """

    base_hidden: Tensor
    thought_hidden: list[Tensor]
    thought_tokens: Tensor
    talk_hidden: list[Tensor]
    attention_mask: Optional[Tensor] = None
    segments: Optional[Tensor] = None
    positions: Optional[ThoughtPositions] = None
    router_logits: Optional[tuple[Tensor, ...]] = None


def check_supported(lm: PreTrainedModel) -> None:
    """Raise a clear error for settings the thought passes cannot run under, and for a model whose attention they
    cannot take over (every decoder layer must call transformers' attention interface, without attention sinks or a
    bias added to its mask, full or sliding-window attention) or whose logits :class:`OutputProjection` does not
    reproduce: checked once per model and attention implementation, by a forward of two tokens."""
    implementation = getattr(lm.config, "_attn_implementation", None)
    if implementation is not None and "flash" in implementation:
        raise ValueError(f"Quiet-STaR: attn_implementation {implementation!r} cannot take the 4D thought mask; "
                         "use ModelSpec.attn_implementation 'sdpa' or 'eager'")
    checkpointing = (getattr(type(lm), "is_activation_checkpointing", None)
                     or getattr(type(lm), "is_gradient_checkpointing", None))
    if checkpointing is not None and checkpointing.fget(lm):
        raise ValueError("Quiet-STaR: gradient checkpointing re-runs each layer in the backward, outside the "
                         "thought passes whose keys it needs; set ModelSpec.gradient_checkpointing to false")
    if lm not in _interface_checked or _interface_checked[lm] != implementation:
        _check_attention_interface(lm)
        _interface_checked[lm] = implementation


#: Models (and the attention implementation) whose every layer was seen to call transformers' attention interface.
_interface_checked: "weakref.WeakKeyDictionary[nn.Module, Optional[str]]" = weakref.WeakKeyDictionary()
_PROBE = "lightning_tokens_thoughts_probe"
_probe_calls: list[nn.Module] = []
_probe_options: set[str] = set()
#: Options of transformers' attention functions the thought attention does not apply: attention sinks (gpt-oss).
_UNAPPLIED = {"s_aux": "attention sinks (s_aux)", "sinks": "attention sinks (sinks)"}
_BIASED = "a bias added to its attention mask (ALiBi)"


def _probe_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any = None,
                     *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
    """Records the call, the options it takes that the thought attention would drop and a mask that is not a plain
    one (an additive mask must be 0 wherever it is not a large negative); a zero output of the right shape."""
    _probe_calls.append(module)
    _probe_options.update(text for name, text in _UNAPPLIED.items() if kwargs.get(name) is not None)
    if has_position_bias(attention_mask):
        _probe_options.add(_BIASED)
    return value.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def _check_attention_interface(lm: PreTrainedModel) -> None:
    """Refuse a model some of whose layers do not call transformers' attention interface (Falcon's own attention,
    recurrent layers): the thought passes swap their attention in there, so such a layer would read every
    branch's tokens unmasked. A forward of two tokens, under ``no_grad``, with a probe swapped in the same way; its
    last position's logits are compared with :class:`OutputProjection`'s (the passes project hidden states with it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(_PROBE, _probe_attention)
    AttentionMaskInterface.register(_PROBE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config, error = lm.config, None
    previous = config._attn_implementation
    device = lm.get_input_embeddings().weight.device
    _probe_calls.clear()
    _probe_options.clear()
    config._attn_implementation = _PROBE
    capture, logits = HeadInputCapture(lm), None
    capture.start(keep_last=True)
    try:
        with torch.no_grad():
            logits = lm(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False).logits
    except Exception as failure:  # noqa: BLE001 - a layer that skips the interface may fail on the probe's mask
        error = failure
    finally:
        config._attn_implementation = previous
        hidden = capture.stop()
    called = {id(module) for module in _probe_calls}
    _probe_calls.clear()
    missing = [i for i, layer in enumerate(decoder_layers(lm)) if not any(id(m) in called for m in layer.modules())]
    if not missing and error is not None:
        raise error
    model_type = getattr(config, "model_type", type(lm).__name__)
    if _probe_options:
        raise ValueError(f"Quiet-STaR: the attention of model type {model_type!r} uses "
                         f"{', '.join(sorted(_probe_options))}, which the thought passes' attention does not apply; "
                         "use another model (llama, qwen2, mistral, gemma2, gemma3...)")
    if missing:
        failed = f" (the probe forward failed: {type(error).__name__}: {error})" if error is not None else ""
        raise ValueError(f"Quiet-STaR: the attention of model type {model_type!r} does not go through transformers' "
                         f"attention interface in decoder layers {missing}{failed}, so the thought passes cannot "
                         "mask it; use a model whose attention does (llama, qwen2, mistral, gemma, phi3...)")
    layer_windows(lm)  # refuses a kind of layer it does not know
    if hidden is None or logits is None:
        raise ValueError(f"Quiet-STaR: the causal LM of model type {model_type!r} did not call its output layer "
                         "(get_output_embeddings()) in its forward; the thought passes project hidden states with it")
    try:
        OutputProjection(lm).check(hidden[..., -1:, :], logits[..., -1:, :])
    except UnsupportedLogits as unsupported:
        raise ValueError(f"Quiet-STaR: model type {model_type!r} post-processes its logits after the output layer in "
                         "a way the thought passes do not reproduce (they apply Cohere's logit_scale, Granite's "
                         "logits_scaling and Gemma's final_logit_softcapping)") from unsupported


def positions_of(attention_mask: Tensor) -> Tensor:
    """``(B, L)`` position ids that skip left padding (0 at each row's first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def text_mask(attention_mask: Tensor, sliding_window: Optional[int] = None,
              segments: Optional[Tensor] = None) -> Tensor:
    """``(B, L, L)`` bool: query ``i`` may read key ``j`` (causal, real keys of its own sample when ``segments``
    number the samples of packed rows, within ``sliding_window`` when given; always itself, so no row is empty).
    The thought passes take it without a window and apply each layer's own (see :func:`layer_windows`)."""
    length = attention_mask.shape[-1]
    index = torch.arange(length, device=attention_mask.device)
    allowed = (index[None, :] <= index[:, None])[None] & attention_mask.bool()[:, None, :]
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    if sliding_window is not None:
        allowed &= (index[:, None] - index[None, :] < sliding_window)[None]
    return allowed | torch.eye(length, dtype=torch.bool, device=attention_mask.device)[None]


def layer_windows(lm: PreTrainedModel) -> list[Optional[int]]:
    """Each decoder layer's sliding attention window (``None``: full attention), as transformers' masks apply them:
    by ``config.layer_types`` where the config lists them (Gemma 2/3 and Cohere 2 alternate), else
    ``config.sliding_window`` in every layer unless ``use_sliding_window`` is false.

    Raises:
        ValueError: A layer type other than full and sliding-window attention (Llama 4's chunked attention).
    """
    config = lm.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"Quiet-STaR: config.layer_types of model type {config.model_type!r} holds {unknown}; the "
                             "thought passes' attention knows full_attention and sliding_attention only")
        return [window if kind == "sliding_attention" else None for kind in types]
    if window is None or getattr(config, "use_sliding_window", True) is False:
        window = None
    return [window] * len(decoder_layers(lm))


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
            :data:`~lightning_tokens.quiet_star.attention.DEFAULT_QUERY_CHUNK`.
        think_at: Where to think (see :mod:`.positions`): ``"all"`` positions, or per row the ``int`` number or
            ``float`` share of ``candidates`` with the highest next-token entropy of the text pass. Default ``"all"``.
        candidates: ``(B, L)`` bool positions ``think_at`` may choose. Default ``None``: every real position.
    """
    check_supported(lm)
    backbone, head, embed = decoder_of(lm), OutputProjection(lm), lm.get_input_embeddings()
    batch, length = input_ids.shape
    n = n_thoughts
    segments = None if position_ids is None else segment_ids(position_ids)
    positions = positions_of(attention_mask) if position_ids is None else position_ids
    allowed = text_mask(attention_mask, segments=segments)
    embeds = embed(input_ids)
    dtype = embeds.dtype
    windows = {layer: window for layer, window in enumerate(layer_windows(lm)) if window is not None}
    state = ThoughtPassState(allowed, query_chunk, capacity=thought_length + n_ahead_talk + 1, sliding_windows=windows)
    chosen: Optional[ThoughtPositions] = None
    branch_positions = positions

    routed = collects_router_logits(lm)
    router_logits = None

    def step(inputs: Tensor, pass_index: int) -> Tensor:
        """Pass ``pass_index``: the text (0, ``B`` rows) or a thought or talk pass at positions ``i + k``."""
        nonlocal router_logits
        state.pass_index = pass_index
        position_ids = positions if pass_index == 0 else branch_positions.repeat_interleave(n, 0) + pass_index
        routing = {"output_router_logits": pass_index == 0} if routed else {}
        output = backbone(inputs_embeds=inputs, position_ids=position_ids, use_cache=False, **routing)
        if routed and pass_index == 0:
            router_logits = output.router_logits
        return output.last_hidden_state

    rows = batch * n
    thought_hidden: list[Tensor] = []
    tokens: list[Tensor] = []
    with thought_attention_mode(lm, state):
        base_hidden = step(embeds, 0)
        if think_at != "all":
            entropy = next_token_entropy(head, base_hidden, forbidden_ids)
            chosen = choose_positions(entropy, attention_mask.bool() if candidates is None else candidates, think_at)
            branch_positions = chosen.take(positions)
            state.query_allowed, state.query_index = chosen.take(allowed), chosen.index
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
    return ThoughtPasses(base_hidden, thought_hidden, thought_tokens, talk_hidden, attention_mask, segments, chosen,
                         router_logits)
