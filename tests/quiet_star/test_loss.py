"""The Quiet-STaR loss: every part against the loss written position by position, the next-token targets, the
difficult tokens, and the loss parts of families that post-process their logits against the model's own logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.modeling import decoder_of
from lightning_tokens.quiet_star import next_token_targets, quiet_star_loss
from tests.quiet_star.families import POST, masked, post_module
from tests.quiet_star.naive import N_THOUGHTS, TALK, TOL, batch, make_module, naive_branch, reference_loss, run_passes
from tests.tiny import padded_rows


@pytest.mark.parametrize("labels", [False, True])
def test_loss_parts_equal_an_independent_computation(labels):
    module = make_module(base_loss_weight=0.3, policy_weight=7.0)
    ids, mask = batch()
    label_ids = ids.masked_fill(mask == 0, -100)
    if labels:
        label_ids[:, :3] = -100  # a prompt
        module.train_on = "labels"
    generator = torch.Generator().manual_seed(5)
    passes = run_passes(module, ids, mask, temperature=1.0, generator=generator)
    targets = next_token_targets(ids, mask, label_ids if labels else None)
    out = quiet_star_loss(passes, module.lm.get_output_embeddings(), module.mixing_head, targets,
                          module.forbidden_ids, N_THOUGHTS, base_loss_weight=0.3, policy_weight=7.0,
                          reinforce_temperature=3.0)
    with torch.no_grad():
        expected = reference_loss(module, passes, ids, mask, targets, 0.3, 7.0, 3.0)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).detach(), value.detach().to(getattr(out, name).dtype),
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert out.policy_loss.abs() > 0 and out.reward.abs() > 0  # the check is not vacuous


def test_targets_and_difficult_tokens():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, 8, -100, -100], [6, 7, 8, 9, -100]]
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 6, 7, 8, 9]])
    assert next_token_targets(ids, mask, labels).tolist() == [[-100, 7, 8, -100, -100], [6, 7, 8, 9, -100]]
    module = make_module()
    ids, mask = batch()
    passes = run_passes(module, ids, mask)
    targets = next_token_targets(ids, mask)
    out = quiet_star_loss(passes, module.lm.get_output_embeddings(), module.mixing_head, targets,
                          module.forbidden_ids, N_THOUGHTS, difficult_fraction=0.25)
    with torch.no_grad():
        logits = module.lm.get_output_embeddings()(passes.base_hidden).clone()
        logits[..., module.forbidden_ids] = float("-inf")
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        values = ce[targets.flatten() >= 0]
        k = math.ceil(0.25 * values.numel())
        torch.testing.assert_close(out.difficult_base_nll, values.sort(descending=True).values[:k].mean().float())
    assert out.difficult_base_nll >= out.base_nll


@pytest.mark.parametrize("case", list(POST))
def test_loss_parts_come_from_the_models_own_logits(case):
    """Base NLL against the model's own CE; with the mixing weight at 1, the mixed NLL and the reward against the
    model's own logits of each talk step of the sequential re-run."""
    module = post_module(case)
    module.mixing_head.forward = lambda base, thought: (thought, torch.ones_like(thought[..., :1]))
    ids, mask = padded_rows([[5, 17, 33, 8, 90, 41, 7], [12, 250, 3, 64, 19]], 7, "right")
    out = module.quiet_star(ids, mask, temperature=0.0)
    lm, forbidden = module.lm, module.forbidden_ids

    with torch.no_grad():
        full = masked(lm(input_ids=ids, attention_mask=mask).logits, forbidden)
        hidden = decoder_of(lm)(input_ids=ids, attention_mask=mask).last_hidden_state
        bare = masked(lm.get_output_embeddings()(hidden), forbidden)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    base_nll = F.cross_entropy(full[:, :-1].transpose(1, 2), targets, ignore_index=-100).float()
    torch.testing.assert_close(out.base_nll, base_nll, **TOL)
    bare_nll = F.cross_entropy(bare[:, :-1].transpose(1, 2), targets, ignore_index=-100)
    assert abs(bare_nll - base_nll) > 1e-2, "the post-processing hardly matters here: the test would not see it"

    base_ce = F.cross_entropy(full[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    step_ce, rewards = {s: [] for s in range(TALK)}, []
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length - 1):
            future = ids[b, i + 1: min(length, i + TALK + 1)]
            with torch.no_grad():
                _, _, talk = naive_branch(module, ids[b, : i + 1], future)
            ce = [F.cross_entropy(masked(logits, forbidden), future[s]) for s, (logits, _) in enumerate(talk)]
            for s, value in enumerate(ce):
                step_ce[s].append(value)
            if len(ce) == TALK:
                rewards.append(sum(base_ce[b, i + s] - ce[s] for s in range(TALK)))
    mixed_nll = torch.stack([torch.stack(values).mean() for values in step_ce.values()]).mean()
    torch.testing.assert_close(out.mixed_nll, mixed_nll.float(), **TOL)
    torch.testing.assert_close(out.reward, torch.stack(rewards).mean().float(), **TOL)
