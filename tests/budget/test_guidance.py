"""Budget guidance (budget/guidance.py): the processor's p * w against scipy, fallbacks, batching against a naive
loop, step boundaries, composition with sampling, errors, and the thinking-length estimate."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats

from lightning_tokens.budget import (
    BudgetForcing,
    BudgetGuidanceLogitsProcessor,
    BudgetPredictor,
    estimate_thinking_length,
    guidance_weights,
)
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.budget.helpers import ids
from tests.tiny import tiny_config


class FixedGamma(BudgetPredictor):
    """A predictor whose (alpha, rate) per vocabulary row are fixed tensors, whatever the hidden states."""

    def __init__(self, config, alpha, rate):
        super().__init__(config)
        self.alpha_v, self.rate_v = alpha, rate

    def gamma(self, features, tokens=None):
        a = self.alpha_v.expand(features.shape[0], -1)
        r = self.rate_v.expand(features.shape[0], -1)
        if tokens is None:
            return a, r
        return a.gather(1, tokens), r.gather(1, tokens)


def fixed_predictor(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = BudgetPredictor.for_model(model)
    vocab = base.config.vocab_size
    alpha = 1.0 + 20 * torch.rand(vocab, generator=g)
    rate = 2.0 + 20 * torch.rand(vocab, generator=g)
    return FixedGamma(base.config, alpha, rate)


def test_guidance_weights_masks_untrained_rows():
    alpha = torch.tensor([[30.0, 30.0, 0.9, 3.0]])
    rate = torch.tensor([[12.0, 5.0, 12.0, 10.0]])
    w = guidance_weights(alpha, rate, torch.tensor([40.0]))
    y = math.log(41)
    expected = [stats.gamma.cdf(y, 30.0, scale=1 / 12), 0.0, 0.0, 0.0]
    # kept: rate >= 10, alpha > 1, decoded mode exp(29 / 12) - 1 >= 0.9; dropped: rate 5 < 10, alpha <= 1,
    # and decoded mode exp(2 / 10) - 1 < 0.9.
    torch.testing.assert_close(w[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    low_mode = guidance_weights(torch.tensor([[1.5]]), torch.tensor([[100.0]]), torch.tensor([5.0]))
    assert low_mode.item() == 0.0  # exp(0.005) - 1 < 0.9
    underflow = guidance_weights(torch.tensor([[0.0]]), torch.tensor([[12.0]]), torch.tensor([5.0]))
    assert underflow.item() == 0.0  # a masked shape of 0 (softplus underflow) gives 0, not gammainc(0, 0) = NaN


def run_forward(model, input_ids):
    return model(input_ids, attention_mask=(input_ids != 0).long()).logits[:, -1]


def test_processor_output_is_p_times_w_renormalised(lm):
    model, tokenizer = lm
    predictor = fixed_predictor(model)
    S, = ids(tokenizer, "<think>")
    input_ids = torch.tensor([[1, 40, 41, S, 50, 51], [1, 42, S, 60, 61, 62]])
    budgets = [3.0, 50.0]
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, budgets, steps="every") as guide:
        scores = run_forward(model, input_ids)
        out = guide(input_ids, scores)
    p = torch.softmax(scores.double(), -1)
    for row, (t, budget) in enumerate(zip([2, 3], budgets)):
        y = math.log(max(budget - t, 1) + 1)
        a, r = predictor.alpha_v.double(), predictor.rate_v.double()
        w = torch.from_numpy(stats.gamma.cdf(y, a.numpy(), scale=1 / r.numpy()))
        mode = torch.exp((a - 1) / r) - 1
        w = torch.where((r >= 10) & (a > 1) & (mode >= 0.9), w, torch.zeros_like(w))
        expected = p[row] * w / (p[row] * w).sum()
        torch.testing.assert_close(torch.exp(out[row].double()), expected, rtol=1e-4, atol=1e-7)


def test_processor_top_k_scores_only_the_candidates(lm):
    model, tokenizer = lm
    predictor = fixed_predictor(model, seed=3)
    S, = ids(tokenizer, "<think>")
    input_ids = torch.tensor([[1, 40, S, 50]])
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 20, steps="every", top_k=7) as guide:
        scores = run_forward(model, input_ids)
        out = guide(input_ids, scores)
    p = torch.softmax(scores[0].double(), -1)
    top = p.topk(7).indices
    a, r = predictor.alpha_v.double(), predictor.rate_v.double()
    w = guidance_weights(a[None], r[None], torch.tensor([19.0]))[0].double()
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[top] = True
    expected = torch.where(keep, p * w, torch.zeros_like(p))
    torch.testing.assert_close(torch.exp(out[0].double()), expected / expected.sum(), rtol=1e-4, atol=1e-7)


def test_all_zero_weights_fall_back_to_argmax(lm):
    model, tokenizer = lm
    predictor = BudgetPredictor.for_model(model)  # untrained: softplus(~0) rates < 10, every row masked
    input_ids = torch.tensor([[1, 40, ids(tokenizer, "<think>")[0]]])
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 10) as guide:
        scores = run_forward(model, input_ids)
        out = guide(input_ids, scores)
    assert out[0].argmax() == scores[0].argmax() and torch.isinf(out[0]).sum() == out.shape[1] - 1
    # only banned tokens (-inf from an earlier processor) keep w > 0: still the argmax, no NaN
    fixed = fixed_predictor(model)
    with BudgetGuidanceLogitsProcessor(model, fixed, tokenizer, 10) as guide:
        trusted = guidance_weights(fixed.alpha_v[None], fixed.rate_v[None], torch.tensor([9.0]))[0] > 0
        banned = run_forward(model, input_ids).masked_fill(trusted[None], float("-inf"))
        out = guide(input_ids, banned)
    assert not torch.isnan(out).any() and out[0].argmax() == banned[0].argmax()


def three_rows_one_falling_back(model, tokenizer):
    """Row 0 has not started thinking, row 1 keeps w > 0 only on banned tokens (argmax fallback), row 2 is guided.

    Returns the fixed predictor, the ``(3, 4)`` input ids and row-1-banned scores (budget 10, one token thought).
    """
    predictor = fixed_predictor(model)
    S, = ids(tokenizer, "<think>")
    input_ids = torch.tensor([[1, 40, 41, 42], [1, 40, S, 50], [1, S, 50, 51]])
    trusted = guidance_weights(predictor.alpha_v[None], predictor.rate_v[None], torch.tensor([9.0]))[0] > 0
    assert trusted.any() and not trusted.all()
    scores = run_forward(model, input_ids)
    scores[1] = scores[1].masked_fill(trusted, float("-inf"))
    return predictor, input_ids, scores


def test_fallbacks_are_counted_per_row_and_a_mostly_unguided_run_warns(lm):
    model, tokenizer = lm
    predictor, input_ids, scores = three_rows_one_falling_back(model, tokenizer)
    guide = BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 10, steps="every")
    model(input_ids)  # the hidden states the processor reads
    guide(input_ids, scores)
    assert guide.guided_row_steps == 2 and guide.fallback_share == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide.remove()  # half fell back: not "most", no warning
    # An untrained predictor's rates are below 10: every row of every step falls back, and leaving says so.
    with pytest.warns(UserWarning, match=r"at 100% of 2 guided row-steps every candidate failed"):
        untrained = BudgetPredictor.for_model(model)
        with BudgetGuidanceLogitsProcessor(model, untrained, tokenizer, 10, steps="every") as guide:
            guide(input_ids[1:], run_forward(model, input_ids[1:]))
    assert guide.fallback_share == 1.0


def test_removing_inside_the_with_block_warns_once(lm):
    model, tokenizer = lm
    S, = ids(tokenizer, "<think>")
    input_ids = torch.tensor([[1, S, 50, 51]])
    hooks = [len(module._forward_hooks) for module in model.modules()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with BudgetGuidanceLogitsProcessor(model, BudgetPredictor.for_model(model), tokenizer, 10,
                                           steps="every") as guide:
            guide(input_ids, run_forward(model, input_ids))
            guide.remove()  # explicit removal, then the end of the block
    fallback_warnings = [w for w in caught if "guided row-steps every candidate failed" in str(w.message)]
    assert guide.fallback_share == 1.0 and len(fallback_warnings) == 1
    assert [len(module._forward_hooks) for module in model.modules()] == hooks  # its hooks are off


def test_only_guided_rows_change_each_as_if_alone(lm):
    model, tokenizer = lm
    predictor, input_ids, scores = three_rows_one_falling_back(model, tokenizer)
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 10, steps="every") as guide:
        model(input_ids)
        out = guide(input_ids, scores)
        alone = []
        for row in (1, 2):
            guide.reset()
            model(input_ids[row:row + 1])
            alone.append(guide(input_ids[row:row + 1], scores[row:row + 1])[0])
    assert torch.equal(out[0], scores[0])
    assert out[1].argmax() == scores[1].argmax() and torch.isinf(out[1]).sum() == out.shape[1] - 1
    torch.testing.assert_close(out[1], alone[0])
    torch.testing.assert_close(out[2], alone[1], rtol=1e-5, atol=1e-5)
    p = torch.softmax(scores[2].double(), -1)
    w = guidance_weights(predictor.alpha_v[None], predictor.rate_v[None], torch.tensor([8.0]))[0].double()
    torch.testing.assert_close(torch.exp(out[2].double()), p * w / (p * w).sum(), rtol=1e-4, atol=1e-7)


def naive_guided_greedy(model, predictor, prompt, budget, S, E, steps, newline, min_rate):
    """Reference decoding: one full forward per step with output_hidden_states, guidance from scratch."""
    seq = list(prompt)
    start = max(i for i, tok in enumerate(seq) if tok == S)
    ended = False
    for step in range(steps):
        out = model(torch.tensor([seq]), output_hidden_states=True)
        logits = out.logits[0, -1].float()
        t = len(seq) - start - 1 - 0
        guided = not ended and (step == 0 or t == 0 or newline[seq[-1]])
        if guided:
            states = torch.stack([h[:, -1] for h in out.hidden_states], dim=1)
            alpha, rate = predictor(states)
            w = guidance_weights(alpha, rate, torch.tensor([max(budget - t, 1.0)]), min_rate, 0.0, -1.0)[0]
            choice = int((torch.softmax(logits, -1) * w).argmax()) if (w > 0).any() else int(logits.argmax())
        else:
            choice = int(logits.argmax())
        seq.append(choice)
        ended = ended or choice == E
    return seq[len(prompt):]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
def test_batched_guided_generate_equals_each_row_alone_and_a_naive_loop(model_type, tokenizer):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type)))
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(1)
    predictor = BudgetPredictor.for_model(model).eval()
    with torch.no_grad():
        predictor.rate_head.weight.mul_(100)  # spread the rates so guidance changes choices
    S, E = ids(tokenizer, "<think>", "</think>")
    from lightning_tokens.budget.guidance import newline_mask

    newline = newline_mask(tokenizer, predictor.config.vocab_size)
    prompts = ["Compute 1 + 2.<think>\n", "Compute 12 + 30 - 4.<think>\n1"]
    budgets = [4.0, 30.0]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, budgets, min_rate=0.0, min_shape=0.0,
                                       min_mode=-1.0) as guide:
        batch = model.generate(**enc, logits_processor=[guide], **options)[:, enc["input_ids"].shape[1]:]
        for row, (prompt, budget) in enumerate(zip(prompts, budgets)):
            one = tokenizer([prompt], return_tensors="pt")
            guide.budgets = [budget]
            alone = model.generate(**one, logits_processor=[guide], **options)[0, one["input_ids"].shape[1]:]
            assert batch[row].tolist() == alone.tolist()
            naive = naive_guided_greedy(model, predictor, one["input_ids"][0].tolist(), budget, S, E, 8, newline, 0.0)
            assert alone.tolist() == naive
    plain = model.generate(**enc, **options)[:, enc["input_ids"].shape[1]:]
    assert not torch.equal(plain, batch)  # guidance did change something


def test_guidance_is_off_after_think_end(lm):
    model, tokenizer = lm
    predictor = fixed_predictor(model)
    S, E = ids(tokenizer, "<think>", "</think>")
    newline_token = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 5, steps="every") as guide:
        closed = torch.tensor([[1, 40, S, 50, E, newline_token]])
        scores = run_forward(model, closed)
        assert torch.equal(guide(closed, scores), scores)  # closed in the prompt
        seq = torch.tensor([[1, 40, S, 50]])
        changed = []
        for token in (51, E, newline_token, 52):
            scores = run_forward(model, seq)
            changed.append(not torch.equal(guide(seq, scores), scores))
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
        assert changed == [True, True, False, False]  # guided while thinking, never after </think>


def test_newline_steps_guide_only_at_step_boundaries(lm):
    model, tokenizer = lm
    predictor = fixed_predictor(model)
    S, = ids(tokenizer, "<think>")
    newline_token = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 50) as guide:
        seq = torch.tensor([[1, 40, S]])
        changed = []
        for token in (50, 51, newline_token, 52, 53):
            scores = run_forward(model, seq)
            changed.append(not torch.equal(guide(seq, scores), scores))
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
        # first step, then only after the newline token
        assert changed == [True, False, False, True, False]


def test_bad_budgets_get_clear_errors(lm):
    model, tokenizer = lm
    predictor = BudgetPredictor.for_model(model)
    for bad in (0, -3, [10, 0], float("nan")):
        with pytest.raises(ValueError, match="budget"):
            BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, bad).remove()
        with pytest.raises(ValueError, match="budget"):
            BudgetForcing(tokenizer, bad)
    enc = tokenizer(["a", "b", "c"], return_tensors="pt", padding=True)
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, [10, 20]) as guide:
        with pytest.raises(ValueError, match="budgets has 2 entries but the batch has 3 rows"):
            model.generate(**enc, logits_processor=[guide], max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="think_end"):
        BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 10, think_end="not one token")


def test_guidance_composes_with_sampling_and_other_processors(lm):
    model, tokenizer = lm
    predictor = fixed_predictor(model)
    from transformers import RepetitionPenaltyLogitsProcessor

    enc = tokenizer(["Compute 1 + 2.<think>", "Compute 5 - 3.<think>"], return_tensors="pt", padding=True)
    with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, [5, 9], steps="every") as guide:
        torch.manual_seed(0)
        out = model.generate(**enc, logits_processor=[RepetitionPenaltyLogitsProcessor(1.3), guide], do_sample=True,
                             temperature=0.8, top_k=20, max_new_tokens=6, pad_token_id=0)
    assert out.shape == (2, enc["input_ids"].shape[1] + 6) and guide.guided_steps > 0


def test_estimate_thinking_length_matches_a_hand_computation(lm):
    model, tokenizer = lm
    predictor = fixed_predictor(model)
    enc = tokenizer(["Compute 1 + 2.<think>", "Compute 12 + 30 - 4.<think>"], return_tensors="pt", padding=True)
    estimate = estimate_thinking_length(model, predictor, enc["input_ids"], enc["attention_mask"], top_k=5)
    logits = model(**enc).logits[:, -1]
    for row in range(2):
        p, top = torch.softmax(logits[row], -1).topk(5)
        mode = torch.exp((predictor.alpha_v[top] - 1) / predictor.rate_v[top]) - 1
        torch.testing.assert_close(estimate[row], (p * mode).sum() / p.sum() - 1, rtol=1e-4, atol=1e-4)
