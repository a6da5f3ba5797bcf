"""``think_at``: thoughts at the positions of highest next-token entropy only, against an independent entropy,
against the same branches of every-position thinking, and against the position-by-position loss."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lightning_tokens.cli import build_cli
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule, next_token_targets, parallel, parallel_thoughts
from lightning_tokens.quiet_star.positions import choose_positions
from tests.quiet_star.naive import N_THOUGHTS, TALK, THOUGHT_LENGTH, make_module, reference_loss
from tests.tiny import padded_rows, tiny_config

LENGTHS = (9, 4, 7)


def rows_batch(side: str, width: int = 10):
    g = torch.Generator().manual_seed(5)
    return padded_rows([torch.randint(3, 300, (n,), generator=g).tolist() for n in LENGTHS], width, side)


def per_thought_sampler(monkeypatch, vocab: int) -> None:
    """Thought tokens as a function of the logits and the thought's number alone (one fixed Gumbel draw per thought
    number): the same at a position whether or not other positions think, and different between the thoughts of
    a position, so the advantages and the REINFORCE term are not zero."""
    noise = -torch.log(-torch.log(torch.rand(N_THOUGHTS, vocab, generator=torch.Generator().manual_seed(9))))

    def sample(logits, temperature, generator=None):
        number = torch.arange(logits.shape[0]) % N_THOUGHTS
        return (logits + noise[number][:, None].to(logits.dtype)).argmax(-1)

    monkeypatch.setattr(parallel, "sample_tokens", sample)


def loss_and_gradients(module, ids, mask, labels=None):
    module.zero_grad()
    out = module.quiet_star(ids, mask, labels)
    out.loss.backward()
    return out.metrics(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def independent_entropy(module, ids, mask):
    """Next-token entropy from a plain forward of the model (delimiters masked), positions skipping left padding."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = module.lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits.double()
    logits[..., module.forbidden_ids] = float("-inf")
    p = logits.softmax(-1)
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def independent_candidates(ids, mask, labels=None):
    """Real positions ``i`` with a target at some ``i + s``, ``s < TALK``, written as loops."""
    source = ids if labels is None else labels
    batch, length = ids.shape
    out = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for s in range(TALK):
                j = i + s
                if mask[b, i] and j + 1 < length and mask[b, j] and mask[b, j + 1] and source[b, j + 1] != -100:
                    out[b, i] = True
    return out


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_thinking_at_every_candidate_equals_thinking_at_all(monkeypatch, model_type, side, labels):
    """A number or share that takes every candidate gives the loss, every part and the gradients of "all"."""
    ids, mask = rows_batch(side)
    label_ids = ids.masked_fill(mask == 0, -100)
    label_ids[:, :6] = -100  # a prompt: some positions think only for later talk steps
    module = make_module(model_type, policy_weight=3.0).eval()  # no dropout (gpt2's), drawn per position
    per_thought_sampler(monkeypatch, module.lm.get_output_embeddings().weight.shape[0])
    if labels:
        module.train_on = "labels"
    expected, expected_grads = loss_and_gradients(module, ids, mask, label_ids)
    assert expected["mixed_nll"] > 0 and expected["policy_loss"] != 0
    for think_at in (ids.shape[1], 1.0):
        module.think_at = think_at
        got, grads = loss_and_gradients(module, ids, mask, label_ids)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=f"{think_at} {name}")  # float32 CE
        assert grads.keys() == expected_grads.keys()
        for name, value in expected_grads.items():
            torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-7, msg=f"{think_at} {name}")
        module.think_at = "all"


@pytest.mark.parametrize("think_at", [3, 0.4])
@pytest.mark.parametrize("side", ["right", "left"])
def test_chosen_positions_are_the_highest_entropy_candidates(side, think_at):
    module = make_module()
    ids, mask = rows_batch(side)
    targets = next_token_targets(ids, mask)
    passes = parallel_thoughts(module.lm, ids, mask, module.thought_embeddings.start, module.thought_embeddings.end,
                               module.forbidden_ids, N_THOUGHTS, THOUGHT_LENGTH, TALK, temperature=0.0,
                               think_at=think_at, candidates=independent_candidates(ids, mask))
    entropy = independent_entropy(module, ids, mask)
    candidates = independent_candidates(ids, mask)
    assert (targets != -100).sum() > 0
    for b in range(ids.shape[0]):
        count = int(candidates[b].sum())
        k = min(think_at, count) if isinstance(think_at, int) else math.ceil(Fraction(str(think_at)) * count)
        ranked = sorted(candidates[b].nonzero().flatten().tolist(), key=lambda i: -float(entropy[b, i]))
        got = passes.positions.index[b][passes.positions.valid[b]].tolist()
        assert got == sorted(ranked[:k]), (b, got, ranked)
        assert all(candidates[b, i] for i in got)
    slots = passes.positions.index.shape[1]
    assert slots < ids.shape[1]  # the passes ran on fewer positions than the row has
    assert passes.talk_hidden[0].shape[:2] == (ids.shape[0] * N_THOUGHTS, slots)
    assert passes.thought_tokens.shape == (ids.shape[0] * N_THOUGHTS, slots, THOUGHT_LENGTH)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_chosen_branches_compute_what_every_position_computes_there(side):
    """Thinking at some positions gives, at those positions, the thoughts and hidden states of thinking at all."""
    module = make_module("qwen2")
    ids, mask = rows_batch(side)
    te = module.thought_embeddings
    common = (module.lm, ids, mask, te.start, te.end, module.forbidden_ids, N_THOUGHTS, THOUGHT_LENGTH, TALK)
    everywhere = parallel_thoughts(*common, temperature=0.0)
    chosen = parallel_thoughts(*common, temperature=0.0, think_at=2)
    index = chosen.positions.index.repeat_interleave(N_THOUGHTS, 0)
    valid = chosen.positions.valid.repeat_interleave(N_THOUGHTS, 0)
    taken = everywhere.thought_tokens.gather(1, index[..., None].expand(-1, -1, THOUGHT_LENGTH))
    assert torch.equal(chosen.thought_tokens[valid], taken[valid])
    for part in ("thought_hidden", "talk_hidden"):
        for all_hidden, some_hidden in zip(getattr(everywhere, part), getattr(chosen, part)):
            at = all_hidden.gather(1, index[..., None].expand(-1, -1, all_hidden.shape[-1]))
            torch.testing.assert_close(some_hidden[valid], at[valid], rtol=0, atol=1e-10)


@pytest.mark.parametrize("think_at", [2, 0.5])
def test_loss_is_the_paper_loss_on_the_chosen_positions(monkeypatch, think_at):
    """Every loss part against the position-by-position reference restricted to the chosen branches (read from the
    every-position passes, checked equal there above); the base NLL keeps every target."""
    module = make_module(base_loss_weight=0.3, policy_weight=7.0, think_at=think_at)
    per_thought_sampler(monkeypatch, module.lm.get_output_embeddings().weight.shape[0])
    ids, mask = rows_batch("right")
    out = module.quiet_star(ids, mask)
    te = module.thought_embeddings
    common = (module.lm, ids, mask, te.start, te.end, module.forbidden_ids, N_THOUGHTS, THOUGHT_LENGTH, TALK)
    with torch.no_grad():
        everywhere = parallel_thoughts(*common)
        chosen = torch.zeros_like(mask, dtype=torch.bool)
        some = parallel_thoughts(*common, think_at=think_at,
                                 candidates=independent_candidates(ids, mask)).positions
        for b in range(ids.shape[0]):
            chosen[b, some.index[b][some.valid[b]]] = True
        expected = reference_loss(module, everywhere, ids, mask, next_token_targets(ids, mask), 0.3, 7.0, 3.0, chosen)
    assert chosen.sum() < independent_candidates(ids, mask).sum()
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).detach(), value.to(getattr(out, name).dtype), msg=name)
    assert out.policy_loss != 0


def test_choose_positions_counts_shares_and_empty_rows():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3], [0.2, 0.1, 0.0, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1]])
    candidates = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    by_count = choose_positions(entropy, candidates, 3)
    assert [row[v].tolist() for row, v in zip(by_count.index, by_count.valid)] == [[1, 2, 3], [0, 1], []]
    by_share = choose_positions(entropy, candidates, 0.5)  # ceil(0.5 * 4) = 2, ceil(0.5 * 2) = 1
    assert [row[v].tolist() for row, v in zip(by_share.index, by_share.valid)] == [[1, 3], [0], []]
    assert choose_positions(entropy, candidates, "all") is None
    many = torch.ones(1, 100, dtype=torch.bool)  # 0.07 * 100 is 7.000000000000001 in floats: still 7 positions
    assert int(choose_positions(torch.rand(1, 100), many, 0.07).valid.sum()) == 7


def test_a_row_with_no_candidate_and_short_rows_give_finite_loss_and_gradients():
    module = make_module(think_at=2)
    ids = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 0, 0, 0], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    out = module.quiet_star(ids, mask)
    out.loss.backward()
    assert all(torch.isfinite(v) for v in out.metrics().values()), out.metrics()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("value", [0, -2, 0.0, 1.5, "some", True])
def test_bad_think_at_names_the_field(value):
    with pytest.raises(ValueError, match="think_at"):
        QuietSTaRModule(ModelSpec(config=tiny_config("llama")), think_at=value)


@pytest.mark.parametrize("value,expected", [("8", 8), ("0.25", 0.25), ("all", "all")])
def test_yaml_keeps_a_number_and_a_share_apart(value, expected):
    cli = build_cli(["--model", "QuietSTaRModule", "--model.model.config", '{"model_type": "llama", "hidden_size": 32, '
                     '"intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}',
                     "--model.think_at", value, "--data", "PlainTextDataModule", "--trainer.logger", "false"],
                    run=False)
    assert cli.model.think_at == expected and type(cli.model.think_at) is type(expected)
