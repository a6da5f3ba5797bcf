"""Self-speculative greedy decoding: the heads draft, the model verifies, the output is the model's own greedy one.

Each round feeds the model the next token (already certain) and the K drafts of the heads in one cached
forward. The model's argmax after each of those positions says which drafts it would have produced itself;
the longest agreeing prefix is kept, plus the model's own token after it, so every round yields 1 to K + 1
tokens and exactly the sequence plain greedy decoding would have given. The model's cache is cropped back
to the kept positions; layer heads keep their own small caches and see only kept positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_tokens.heads.heads import MultiTokenHeads, Trunk, capture_trunk
from lightning_tokens.modeling import cache_keyword, causal_lm_of


@dataclass
class SpeculativeStats:
    """What a :func:`generate_with_heads` call did.

    Attributes:
        new_tokens: Tokens generated.
        drafted: Draft tokens proposed to the model.
        accepted: Draft tokens the model agreed with.
        forwards: Model forwards (prefill included).
    """

    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(1, self.forwards)


class _HeadDrafter:
    """Runs the heads incrementally over kept positions and proposes K draft tokens."""

    def __init__(self, heads: MultiTokenHeads, model: nn.Module, num_draft: int) -> None:
        from transformers import DynamicCache

        self.heads, self.model, self.num_draft = heads, model, num_draft
        self.caches = [DynamicCache() if heads.architecture == "layer" else None for _ in range(num_draft)]
        self.length = 0

    def advance(self, trunk: Trunk) -> list[int]:
        drafts = []
        for k in range(1, self.num_draft + 1):  # heads past num_draft are never run
            states = self.heads.head_states(k, trunk, None, self.caches[k - 1], self.length)
            drafts.append(int(self.heads.project(self.model, k, states[:, -1]).argmax(-1)))
        self.length += trunk.hidden.shape[1]
        return drafts


@torch.no_grad()
def generate_with_heads(model: nn.Module, heads: MultiTokenHeads, input_ids: Tensor,
                        attention_mask: Optional[Tensor] = None, max_new_tokens: int = 256,
                        eos_token_id: Optional[int | list[int]] = None,
                        num_draft: Optional[int] = None) -> tuple[Tensor, SpeculativeStats]:
    """Greedy decoding of ``model`` drafted by ``heads``: the same tokens as ``model.generate(do_sample=False)``.

    Args:
        model: The causal LM (plain or PEFT-wrapped); it and the heads are in eval mode for the call.
        heads: Its heads (trained in stage 1 or 2 for a useful acceptance rate).
        input_ids: ``(1, T)`` prompt ids; left padding is allowed and removed.
        attention_mask: ``(1, T)`` its mask. Default ``None``: no padding.
        max_new_tokens: Most tokens to generate. Default ``256``.
        eos_token_id: Stop after this token (or any of these). Default ``None``: the model config's.
        num_draft: Drafts per round, from the first ``num_draft`` heads (the others are not run), at most
            ``heads.num_heads``. Default ``None``: all heads. On small models, where a head layer costs as much
            as a sizeable part of the model, fewer drafts can be faster.

    Returns:
        ``(sequence, stats)``: the ``(1, T' + n)`` prompt (padding removed) and new tokens, and
        :class:`SpeculativeStats` with the acceptance rate.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate_with_heads: input_ids must have shape (1, T), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"generate_with_heads: max_new_tokens must be positive, got {max_new_tokens}")
    num_draft = heads.num_heads if num_draft is None else num_draft
    if not 1 <= num_draft <= heads.num_heads:
        raise ValueError(f"generate_with_heads: num_draft must be in 1..{heads.num_heads}, got {num_draft}")
    from transformers import DynamicCache

    base = causal_lm_of(model)
    if eos_token_id is None:
        eos_token_id = base.generation_config.eos_token_id if base.generation_config is not None else None
        eos_token_id = eos_token_id if eos_token_id is not None else base.config.eos_token_id
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    if attention_mask is not None:
        input_ids = input_ids[:, attention_mask[0].bool()]
    was_training, heads_training = model.training, heads.training
    model.eval()
    heads.eval()
    stats = SpeculativeStats()
    cache = DynamicCache(config=base.config)
    drafter = _HeadDrafter(heads, base, num_draft)
    try:
        with capture_trunk(base) as holder:
            logits = base(input_ids=input_ids, use_cache=True, **{cache_keyword(base): cache}).logits
            stats.forwards += 1
            drafts = drafter.advance(holder["trunk"])
        generated = [int(logits[0, -1].argmax())]
        while len(generated) < max_new_tokens and generated[-1] not in eos:
            budget = max_new_tokens - len(generated)
            proposal = drafts[:budget]
            candidate = torch.tensor([[generated[-1], *proposal]], device=input_ids.device)
            past = cache.get_seq_length()
            with capture_trunk(base) as holder:
                logits = base(input_ids=candidate, use_cache=True, **{cache_keyword(base): cache}).logits
                stats.forwards += 1
                choices = logits[0].argmax(-1).tolist()
                kept = 0
                while kept < len(proposal) and proposal[kept] == choices[kept] and proposal[kept] not in eos:
                    kept += 1
                if kept < len(proposal) and proposal[kept] == choices[kept]:
                    kept += 1  # an agreeing eos is kept and ends the sequence
                stats.drafted += len(proposal)
                stats.accepted += kept
                new = proposal[:kept] if kept and proposal[kept - 1] in eos else [*proposal[:kept], choices[kept]]
                extra = cache.get_seq_length() - (past + 1 + kept)
                if extra > 0:
                    cache.crop(-extra)  # a negative count removes that many positions (transformers 4.x and 5.x)
                drafts = drafter.advance(holder["trunk"].narrow(0, 1 + kept))
            generated.extend(new)
    finally:
        model.train(was_training)
        heads.train(heads_training)
    generated = generated[:max_new_tokens]
    stats.new_tokens = len(generated)
    sequence = torch.cat([input_ids, torch.tensor([generated], device=input_ids.device, dtype=input_ids.dtype)], 1)
    return sequence, stats
