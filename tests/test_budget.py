"""Budget guidance: Gamma formulas, targets, predictor, hook capture, guided generate, budget forcing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats

from conftest import tiny_config
from lightning_tokens.budget import (
    BudgetForcing,
    BudgetGuidanceLogitsProcessor,
    BudgetPredictor,
    HiddenStateCapture,
    PredictorConfig,
    decoded_mode,
    encode_traces,
    estimate_thinking_length,
    gamma_cdf,
    gamma_nll,
    guidance_weights,
    remaining_lengths,
)
from lightning_tokens.budget.predictor import encode_first
from lightning_tokens.data.records import Record
from lightning_tokens.modeling import ModelSpec, load_causal_lm


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = load_causal_lm(ModelSpec(config=tiny_config("llama")))
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def ids(tokenizer, *tokens):
    return tokenizer.convert_tokens_to_ids(list(tokens))


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


# -- Gamma formulas ----------------------------------------------------------------------------------------
def test_gamma_nll_and_cdf_match_scipy():
    g = torch.Generator().manual_seed(0)
    alpha = 0.2 + 30 * torch.rand(200, generator=g, dtype=torch.float64)
    rate = 0.2 + 40 * torch.rand(200, generator=g, dtype=torch.float64)
    y = torch.log1p(1 + 5000 * torch.rand(200, generator=g, dtype=torch.float64))
    ref_nll = -stats.gamma.logpdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    ref_cdf = stats.gamma.cdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    torch.testing.assert_close(gamma_nll(alpha, rate, y).double(), torch.from_numpy(ref_nll), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gamma_cdf(alpha, rate, y).double(), torch.from_numpy(ref_cdf), rtol=1e-4, atol=1e-5)
    mode = decoded_mode(alpha, rate).double()
    torch.testing.assert_close(mode, torch.exp((alpha - 1).clamp_min(0) / rate) - 1, rtol=1e-5, atol=1e-5)


def test_gamma_nll_and_cdf_keep_float64_and_match_scipy_to_1e9_from_1e4_to_1e5():
    # shapes and rates log-uniform over 1e-4 .. 1e5; y near the mean, and spread around it
    g = torch.Generator().manual_seed(1)
    alpha = 10 ** (-4 + 9 * torch.rand(400, generator=g, dtype=torch.float64))
    rate = 10 ** (-4 + 9 * torch.rand(400, generator=g, dtype=torch.float64))
    y = (alpha / rate) * torch.exp(torch.randn(400, generator=g, dtype=torch.float64) * 0.5)
    y = torch.cat([y, torch.tensor([1.0], dtype=torch.float64)])
    alpha = torch.cat([alpha, torch.tensor([1e5], dtype=torch.float64)])
    rate = torch.cat([rate, torch.tensor([1e5], dtype=torch.float64)])  # shape = rate = 1e5, the case
    nll, cdf = gamma_nll(alpha, rate, y), gamma_cdf(alpha, rate, y)
    assert nll.dtype == cdf.dtype == torch.float64
    ref_nll = -stats.gamma.logpdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    ref_cdf = stats.gamma.cdf(y.numpy(), alpha.numpy(), scale=1 / rate.numpy())
    torch.testing.assert_close(nll, torch.from_numpy(ref_nll), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cdf, torch.from_numpy(ref_cdf), rtol=1e-9, atol=1e-9)
    assert decoded_mode(alpha, rate).dtype == torch.float64
    assert gamma_nll(alpha.float(), rate.float(), y.float()).dtype == torch.float32
    assert gamma_nll(alpha.bfloat16(), rate.bfloat16(), y.bfloat16()).dtype == torch.float32  # upcast, not kept


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


# -- targets -----------------------------------------------------------------------------------------------
def naive_targets(seq, prompt_length, start_id, end_id):
    end = next(i for i in range(prompt_length, len(seq)) if seq[i] == end_id)
    starts = [i for i in range(end) if seq[i] == start_id]
    start = starts[-1] if starts else prompt_length - 1
    # hidden state at i sees candidate i + 1; thinking tokens left counting it: those in (i, end].
    return [sum(1 for j in range(i + 1, end + 1)) if start <= i < end else 0 for i in range(len(seq))]


def test_remaining_lengths_match_a_naive_count():
    S, E = 90, 91
    seq = [1, 5, 6, S, 10, 11, 12, 13, E, 20, 21]
    assert remaining_lengths(seq, 3, S, E) == naive_targets(seq, 3, S, E)
    assert remaining_lengths(seq, 3, S, E)[3] == 5 and remaining_lengths(seq, 3, S, E)[7] == 1
    no_start = [1, 5, 6, 10, 11, E, 2]
    assert remaining_lengths(no_start, 3, S, E) == naive_targets(no_start, 3, S, E)
    assert remaining_lengths([1, 5, S, 10, 11], 2, S, E) is None


def test_long_traces_keep_true_targets_and_unfinished_ones_are_counted(tokenizer):
    long_thought = "\n".join(f"{i}+{i}={2 * i}" for i in range(40))
    records = [
        Record({"prompt": "Compute 1 + 2.", "completion": "<think>\n1+2=3\n</think>\nThe answer is 3."}, "a"),
        Record({"prompt": "Compute 9 + 9.", "completion": f"<think>\n{long_thought}\n</think>\nThe answer is 18."},
               "b"),
        Record({"prompt": "Compute 4 + 4.", "completion": "<think>\n4+4=8 and no end"}, "c"),
    ]
    samples, report = encode_traces(records, tokenizer, max_length=40)
    assert (report.kept, report.truncated, report.no_think_end) == (2, 1, 1)
    full = (tokenizer("Compute 9 + 9.")["input_ids"]
            + tokenizer(records[1].fields["completion"], add_special_tokens=False)["input_ids"])
    S, E = ids(tokenizer, "<think>", "</think>")
    expected = naive_targets(full, len(tokenizer("Compute 9 + 9.")["input_ids"]), S, E)[:40]
    assert samples[1].remaining == expected and len(samples[1].input_ids) == 40
    assert max(expected) > 40  # the targets count the thinking cut away


# -- predictor ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", ["transformer", "mlp"])
def test_predictor_gathers_only_requested_rows_and_round_trips(tmp_path, body):
    predictor = BudgetPredictor(PredictorConfig(hidden_size=16, num_states=3, vocab_size=40, body=body)).eval()
    states = torch.randn(5, 3, 16)
    tokens = torch.randint(0, 40, (5,))
    full_a, full_r = predictor(states)
    a, r = predictor(states, tokens)
    torch.testing.assert_close(a, full_a.gather(1, tokens[:, None])[:, 0])
    torch.testing.assert_close(r, full_r.gather(1, tokens[:, None])[:, 0])
    k = torch.randint(0, 40, (5, 4))
    torch.testing.assert_close(predictor(states, k)[0], full_a.gather(1, k))
    assert (full_a > 0).all() and (full_r > 0).all()
    loaded = BudgetPredictor.load(predictor.save(tmp_path / "p.pt"))
    torch.testing.assert_close(loaded(states)[0], full_a)
    with pytest.raises(ValueError, match="states of shape"):
        predictor(torch.randn(5, 2, 16))


@pytest.mark.parametrize("body", ["transformer", "bert"])
def test_eval_features_match_the_encoder_modules(body):
    # eval mode runs encode_first (functional ops, CLS-only last layer); train mode runs nn.TransformerEncoder
    predictor = BudgetPredictor(PredictorConfig(hidden_size=16, num_states=3, vocab_size=40, body=body, d_model=32,
                                                heads=4, depth=3, dropout=0.0))
    states = 3 * torch.randn(5, 3, 16)
    modules = predictor.train().features(states)
    torch.testing.assert_close(predictor.eval().features(states), modules, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # against the modules' own eval fast path too
        x = torch.randn(5, 4, 32)
        torch.testing.assert_close(encode_first(predictor.body, x), predictor.body(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_predictor_body_defaults():
    bert = PredictorConfig(hidden_size=64, num_states=5, vocab_size=10, body="bert")
    assert (bert.d_model, bert.depth, bert.heads, bert.dropout, bert.input_norm) == (768, 12, 12, 0.1, False)
    small = PredictorConfig(hidden_size=1536, num_states=29, vocab_size=10)
    assert (small.d_model, small.depth, small.heads) == (512, 2, 8)
    one_layer_bert = BudgetPredictor(PredictorConfig(hidden_size=8, num_states=2, vocab_size=10, body="bert", depth=1))
    assert one_layer_bert.features(torch.randn(2, 2, 8)).shape == (2, 768)
    with pytest.raises(ValueError, match="PredictorConfig.body"):
        PredictorConfig(hidden_size=8, num_states=2, vocab_size=10, body="lstm")


# -- hidden states captured with hooks ---------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
def test_hook_capture_equals_output_hidden_states(model_type, tokenizer):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(model_type)))
    model.eval()
    x = torch.randint(3, 300, (2, 7))
    with HiddenStateCapture(model, last_only=False) as capture:
        out = model(x, output_hidden_states=True)
        mask = torch.rand(2, 7) > 0.3
        reference = torch.stack(out.hidden_states, dim=2)  # (B, T, N + 1, H)
        torch.testing.assert_close(capture.states, reference)
        torch.testing.assert_close(capture.gather(mask), reference[mask])
    with HiddenStateCapture(model, mask=mask) as capture:
        model(x)
        torch.testing.assert_close(capture.states, reference[mask])
    with HiddenStateCapture(model) as capture:
        model(x)
        torch.testing.assert_close(capture.states, reference[:, -1])
        torch.testing.assert_close(capture.last_states(torch.tensor([1])), reference[[1], -1])
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())


def test_hook_capture_through_a_lora_wrapper(tokenizer):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config("qwen2"), lora={"r": 4, "lora_alpha": 8}))
    model.eval()
    x = torch.randint(3, 300, (2, 6))
    with HiddenStateCapture(model, last_only=False) as capture:
        out = model(input_ids=x, output_hidden_states=True)
        torch.testing.assert_close(capture.states, torch.stack(out.hidden_states, dim=2))
    assert BudgetPredictor.for_model(model).config.num_states == 3


def test_hook_capture_during_generate_equals_a_full_forward(lm):
    model, tokenizer = lm
    enc = tokenizer(["Compute 1 + 2.", "Compute 12 + 30 - 4."], return_tensors="pt", padding=True)
    seen = []

    class Spy:
        def __call__(self, input_ids, scores):
            seen.append((input_ids.clone(), capture.states.clone()))
            return scores

    with HiddenStateCapture(model) as capture:
        out = model.generate(**enc, logits_processor=[Spy()], max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = out.shape[1] - enc["input_ids"].shape[1]
    mask = torch.cat([enc["attention_mask"], torch.ones(2, generated, dtype=torch.long)], 1)
    full = model(out, attention_mask=mask, output_hidden_states=True).hidden_states
    for sequence, states in seen:
        position = sequence.shape[1] - 1
        reference = torch.stack([h[:, position] for h in full], dim=1)
        torch.testing.assert_close(states, reference, rtol=1e-4, atol=1e-4)


# -- guided decoding ---------------------------------------------------------------------------------------
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


# -- budget forcing and difficulty estimate ----------------------------------------------------------------
def test_budget_forcing_closes_thinking_at_the_budget_with_the_cue(lm):
    model, tokenizer = lm
    S, E = ids(tokenizer, "<think>", "</think>")
    cue = tokenizer("\nThe answer is", add_special_tokens=False)["input_ids"]
    enc = tokenizer(["Compute 1 + 2.<think>", "Compute 12 + 30 - 4.<think>\n"], return_tensors="pt", padding=True)
    budgets = [3, 6]
    forcing = BudgetForcing(tokenizer, budgets, answer_cue="\nThe answer is")
    out = model.generate(**enc, logits_processor=[forcing], max_new_tokens=14, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    for row, budget in enumerate(budgets):
        full = out[row].tolist()
        start = max(i for i, tok in enumerate(full) if tok == S)
        thought = full[start + 1:]
        end = thought.index(E) if E in thought[:budget] else budget
        assert end <= budget
        if end == budget:  # forced: </think> right at the budget, then the cue
            assert thought[budget] == E and thought[budget + 1: budget + 1 + len(cue)] == cue
    assert forcing.forced_rows >= 1  # the untrained model does not close thinking by itself


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


def test_trace_files_with_empty_or_unfinished_completions_are_skipped_and_counted(tmp_path, tokenizer):
    import json

    from lightning_tokens.budget.data import read_traces

    path = tmp_path / "traces.jsonl"
    rows = [{"prompt": "Compute 1 + 2.", "completion": "<think>\n1+2=3\n</think>\nThe answer is 3."},
            {"prompt": "Compute 2 + 2.", "completion": ""},
            {"prompt": "Compute 3 + 2.", "completion": "<think>\n3+2="}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples, report = encode_traces(read_traces(path), tokenizer, max_length=64)
    assert (report.kept, report.no_think_end) == (1, 2) and len(samples) == 1


def test_collect_traces_writes_the_models_own_traces(tmp_path, lm):
    import json

    from lightning_tokens.budget import TraceDataModule, collect_main, collect_traces
    from lightning_tokens.data.reasoning_task import thinking_length

    model, tokenizer = lm
    S, E = ids(tokenizer, "<think>", "</think>")
    prompts = [{"prompt": "Compute 1 + 2.<think>", "answer": "3"}, "Compute 5 - 3.<think>\n5-3=2\n"]
    rows = collect_traces(model, tokenizer, prompts, tmp_path / "t.jsonl", max_new_tokens=6, batch_size=2)
    assert [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == rows
    enc = tokenizer([p if isinstance(p, str) else p["prompt"] for p in prompts], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    for row, prompt_ids, new in zip(rows, enc["input_ids"].tolist(), out[:, enc["input_ids"].shape[1]:].tolist()):
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        assert row["completion"] == tokenizer.decode(new, skip_special_tokens=True)
        assert row["finished"] == (E in new)
        assert row["thinking_length"] == thinking_length(new, S, E)
    assert rows[0]["answer"] == "3" and "correct" in rows[0] and "correct" not in rows[1]
    # the command line, on a saved model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    collect_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "c.jsonl"), "--num", "3",
                  "--max-new-tokens", "4", "--batch-size", "2"])
    data = TraceDataModule(train_file=str(tmp_path / "c.jsonl"), val_file=str(tmp_path / "c.jsonl"))
    data.tokenizer = tokenizer
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 3
    finished = sum(json.loads(line)["finished"] for line in lines)
    if finished:
        data.setup()
        assert data.reports["train"].no_think_end == 3 - finished
    else:
        with pytest.raises(ValueError, match="no usable training trace"):
            data.setup()
