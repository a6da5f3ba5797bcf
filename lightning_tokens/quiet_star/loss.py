"""The Quiet-STaR loss on the hidden states of :func:`~lightning_tokens.quiet_star.parallel.parallel_thoughts`.

With ``T`` talk steps and ``n`` thoughts per position (``ce`` = cross-entropy of the true token):

- NLL: ``base_loss_weight * mean ce(base) + (1 - base_loss_weight) * mean_s mean ce(mixed, step s)``.
- A thought branch counts (in the mixed NLL, the mixing weight, the reward) only where it starts at a real
  token and its talk step's target is a real target: branches at padding positions are no thoughts.
- Reward of thought ``k`` at position ``i``: ``r = sum_s [log p_mix(x_i+1+s) - log p_base(x_i+1+s)]``,
  defined where all ``T`` targets exist; advantage ``A = max(0, r - mean_k r)`` (no gradient).
- REINFORCE: ``-A * log pi(t)`` of every sampled thought token with ``pi = softmax(logits / 3)``, averaged
  over sampled tokens and the positions that have a reward (the reference also counts padding and the
  last ``T`` positions in the mean, which only rescales the term); ``loss = NLL + policy_weight * REINFORCE``.
- The delimiter tokens are masked out of every distribution (base, mixed, thought), as in generation.

Vocabulary projections run under activation checkpointing: only ``d``-wide hidden states are kept for
backward, never a ``(rows, L, V)`` logits tensor per pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_tokens.lean_loss import IGNORE_INDEX
from lightning_tokens.quiet_star.mixing import MixingHead
from lightning_tokens.quiet_star.parallel import ThoughtPasses, forbid


@dataclass
class QuietSTaRLoss:
    """The loss and its parts (scalars; all but ``loss`` detached).

    Attributes:
        loss: ``nll + policy_weight * policy_loss`` (plus ``router_loss`` when there is one), with gradient.
        nll: The weighted NLL.
        base_nll: Mean NLL of the model without thoughts.
        mixed_nll: Mean over talk steps of the mixed (with-thought) NLL.
        policy_loss: The REINFORCE term before ``policy_weight``.
        mixing_weight: Mean mixing weight ``w``.
        reward: Mean reward ``r`` (log-likelihood gain of the mixed prediction over the base one).
        difficult_base_nll: Base NLL on the difficult tokens (top ``difficult_fraction`` of base loss).
        difficult_mixed_nll: Mixed NLL (talk step 0, mean over thoughts) on the same tokens.
        router_loss: A mixture-of-experts model's router load-balancing term of the text pass
            (``router_aux_loss_coef * aux_loss``, as its own forward on the batch adds it), or ``None``.
    """

    loss: Tensor
    nll: Tensor
    base_nll: Tensor
    mixed_nll: Tensor
    policy_loss: Tensor
    mixing_weight: Tensor
    reward: Tensor
    difficult_base_nll: Tensor
    difficult_mixed_nll: Tensor
    router_loss: Optional[Tensor] = None

    def metrics(self) -> dict[str, Tensor]:
        """Every part there is by name, detached (for logging)."""
        return {name: value.detach() for name, value in vars(self).items() if value is not None}


def next_token_targets(input_ids: Tensor, attention_mask: Tensor, labels: Optional[Tensor] = None,
                       segments: Optional[Tensor] = None) -> Tensor:
    """``(B, L)``: the token position ``i`` must predict (``x_i+1``), or ``-100`` where there is none.

    Without ``labels`` every real token after a real token is a target (plain text); with ``labels``
    (``-100`` on prompt and padding) only the labelled tokens are. With ``segments`` (the sample numbers of a
    packed batch) a sample's last token predicts nothing.
    """
    mask = attention_mask.bool()
    source = input_ids if labels is None else labels
    valid = mask[:, 1:] & mask[:, :-1] & (source[:, 1:] != IGNORE_INDEX)
    if segments is not None:
        valid &= segments[:, 1:] == segments[:, :-1]
    targets = torch.where(valid, input_ids[:, 1:], IGNORE_INDEX)
    return F.pad(targets, (0, 1), value=IGNORE_INDEX)


def shift_left(values: Tensor, shift: int, fill: float | int) -> Tensor:
    """``values[:, i + shift]`` at ``i`` (dim 1), ``fill`` past the end."""
    if shift == 0:
        return values
    pad = [0, 0] * (values.dim() - 2) + [0, shift]
    return F.pad(values[:, shift:], pad, value=fill)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def quiet_star_loss(
    passes: ThoughtPasses,
    lm_head: Callable[[Tensor], Tensor],
    mixing_head: MixingHead,
    targets: Tensor,
    forbidden_ids: Tensor,
    n_thoughts: int,
    base_loss_weight: float = 0.5,
    policy_weight: float = 1e6,
    reinforce_temperature: float = 3.0,
    difficult_fraction: float = 0.1,
) -> QuietSTaRLoss:
    """The Quiet-STaR loss of one parallel thought forward.

    Args:
        passes: The hidden states and thoughts of :func:`parallel_thoughts`.
        lm_head: Hidden states to logits: the model's :class:`~lightning_tokens.lean_loss.OutputProjection`
            (its output layer, then the post-processing some families apply: Cohere's ``logit_scale``, Granite's
            ``logits_scaling``, Gemma's ``final_logit_softcapping``); a bare output layer leaves that out.
        mixing_head: The mixing head.
        targets: ``(B, L)`` from :func:`next_token_targets`.
        forbidden_ids: Token ids masked out of every distribution (the thought delimiters).
        n_thoughts: Thoughts per position (rows of ``passes`` per batch row).
        base_loss_weight: Weight of the base NLL; the mixed NLL gets the rest (reference
            ``original_loss_weight``). Default ``0.5``.
        policy_weight: Weight of the REINFORCE term (reference ``policy_loss_beta``). Default ``1e6``.
        reinforce_temperature: Temperature of the policy's log-probabilities. Default ``3.0``.
        difficult_fraction: Share of target tokens, highest base loss first, counted as difficult.
            Default ``0.1`` (the top decile).
    """
    n = n_thoughts
    targets = targets.masked_fill(torch.isin(targets, forbidden_ids), IGNORE_INDEX)
    valid = targets != IGNORE_INDEX

    def token_nll(hidden: Tensor, tgt: Tensor) -> Tensor:
        logits = forbid(lm_head(hidden), forbidden_ids).float()
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view_as(tgt)

    def mixed_nll(base: Tensor, thought: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        mixed, weight = mixing_head(base, thought)
        return token_nll(mixed, tgt), weight.squeeze(-1)

    def log_policy(hidden: Tensor, tokens: Tensor) -> Tensor:
        logits = forbid(lm_head(hidden), forbidden_ids).float() / reinforce_temperature
        return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)

    base_ce = checkpoint(token_nll, passes.base_hidden, targets, use_reentrant=False)
    base_nll = _masked_mean(base_ce, valid)

    def at_branches(values: Tensor, shift: int, fill: float | int) -> Tensor:
        """``values (B, L, ...)`` at each thought branch's position plus ``shift``: ``(B * n, P, ...)``."""
        if passes.positions is None:
            return shift_left(values, shift, fill).repeat_interleave(n, 0)
        return passes.positions.take(values, shift, fill).repeat_interleave(n, 0)

    mask = passes.attention_mask if passes.attention_mask is not None else torch.ones_like(targets)
    branch_real = at_branches(mask.bool(), 0, False)
    if passes.positions is not None:
        branch_real &= passes.positions.valid.repeat_interleave(n, 0)
    if passes.segments is not None:
        rows_segments = at_branches(passes.segments, 0, -1)
    step_nlls, weights, weight_masks = [], [], []
    reward = torch.zeros(branch_real.shape, dtype=base_ce.dtype, device=base_ce.device)
    reward_valid = torch.ones_like(branch_real)
    first_mixed_ce = None
    for shift, talk in enumerate(passes.talk_hidden):
        tgt = at_branches(targets, shift, IGNORE_INDEX)
        step_valid = (tgt != IGNORE_INDEX) & branch_real
        if passes.segments is not None:  # a talk step that ran into the next sample of a packed row predicts nothing
            step_valid &= at_branches(passes.segments, shift, -1) == rows_segments
        base = at_branches(passes.base_hidden, shift, 0.0)
        ce, weight = checkpoint(mixed_nll, base, talk, tgt, use_reentrant=False)
        if step_valid.any():
            step_nlls.append(_masked_mean(ce, step_valid))
        weights.append(weight)
        weight_masks.append(step_valid)
        reward = reward + (at_branches(base_ce.detach(), shift, 0.0) - ce.detach())
        reward_valid &= step_valid
        if first_mixed_ce is None:
            first_mixed_ce = ce.detach()
    mixed = torch.stack(step_nlls).mean() if step_nlls else base_nll.new_zeros(())
    nll = base_loss_weight * base_nll + (1 - base_loss_weight) * mixed

    reward = reward * reward_valid
    grouped = reward.view(-1, n, reward.shape[-1])
    advantage = (grouped - grouped.mean(1, keepdim=True)).clamp_min(0).view_as(reward) * reward_valid
    policy = base_nll.new_zeros(())
    sampled = passes.thought_tokens.shape[-1]
    if sampled and reward_valid.any():
        total = base_nll.new_zeros(())
        for index, hidden in enumerate(passes.thought_hidden):
            logp = checkpoint(log_policy, hidden, passes.thought_tokens[..., index], use_reentrant=False)
            total = total - (advantage * logp).sum()
        policy = total / (reward_valid.sum() * sampled)
    loss = nll + policy_weight * policy

    first_mixed_ce = first_mixed_ce.view(-1, n, first_mixed_ce.shape[-1]).mean(1)
    if passes.positions is not None:  # the difficult tokens are counted among the positions thought at
        first_mixed_ce = passes.positions.scatter(first_mixed_ce, valid.shape[-1])
        valid = valid & passes.positions.scatter(passes.positions.valid, valid.shape[-1], False)
    difficult_base, difficult_mixed = _difficult(base_ce.detach(), first_mixed_ce, valid, difficult_fraction)
    mixing_weight = _masked_mean(torch.stack(weights).detach(), torch.stack(weight_masks))
    return QuietSTaRLoss(
        loss=loss, nll=nll.detach(), base_nll=base_nll.detach(), mixed_nll=mixed.detach(),
        policy_loss=policy.detach(), mixing_weight=mixing_weight, reward=_masked_mean(reward, reward_valid),
        difficult_base_nll=difficult_base, difficult_mixed_nll=difficult_mixed,
    )


def _difficult(base_ce: Tensor, mixed_ce: Tensor, valid: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Mean base and mixed NLL over the ``fraction`` of valid targets with the highest base NLL."""
    count = int(valid.sum())
    if count == 0:
        zero = base_ce.new_zeros(())
        return zero, zero
    k = max(1, math.ceil(fraction * count))
    index = base_ce.masked_fill(~valid, float("-inf")).flatten().topk(k).indices
    return base_ce.flatten()[index].mean(), mixed_ce.flatten()[index].mean()
