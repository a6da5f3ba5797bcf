"""ssToken formulas against a naive per-sample implementation that uses eager attention as the oracle."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from architectures import spec_of
from conftest import tiny_config
from lightning_tokens.modeling import ModelSpec, causal_lm_of, decoder_layers, load_causal_lm
from lightning_tokens.sstoken import TokenSelection
from lightning_tokens.sstoken.formulas import keep_count, minmax_per_sample, rank_correlation, select_top

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def build(model_type="llama", **overrides):
    config = tiny_config(model_type, **NO_DROPOUT.get(model_type, {}), **overrides)
    model, _ = load_causal_lm(ModelSpec(config=config))
    return model


def perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make_batch(vocab, left_pad=False, seed=3):
    """4 samples: prompts of 3-5 tokens, responses of 2-7 tokens, padded (right or left)."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [3, 5, 4, 3], [7, 2, 6, 5]
    length = max(p + r for p, r in zip(prompts, responses))
    ids = torch.zeros(4, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        n = p + r
        start = length - n if left_pad else 0
        row = torch.randint(5, vocab, (n,), generator=g)
        ids[b, start:start + n] = row
        mask[b, start:start + n] = 1
        labels[b, start + p:start + n] = row[p:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def naive_token_losses(model, batch):
    """Per-sample dict {input position i: CE of predicting token i} over response tokens (eval mode)."""
    model = causal_lm_of(model)
    was_training = model.training
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    out = []
    for b in range(batch["input_ids"].shape[0]):
        row = {}
        for i in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, i] != -100:
                row[i] = F.cross_entropy(logits[b, i - 1], batch["labels"][b, i]).item()
        out.append(row)
    return out


def naive_attention(model, batch, layer):
    """Per-sample {i: head-mean attention mass from query i to context positions}, from eager attention."""
    base = causal_lm_of(model)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), attn_implementation="eager")
    eager.load_state_dict(base.state_dict())
    eager.eval()
    with torch.no_grad():
        attentions = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_attentions=True).attentions[layer]
    out = []
    for b in range(batch["input_ids"].shape[0]):
        context = [j for j in range(batch["input_ids"].shape[1])
                   if batch["attention_mask"][b, j] == 1 and batch["labels"][b, j] == -100]
        row = {}
        for i in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][b, i] != -100:
                row[i] = attentions[b, :, i, context].sum(-1).mean().item()
        out.append(row)
    return out


def naive_select(rel_rows, attn_rows, gamma, ratio):
    """Kept input positions per sample, straight from the formulas."""
    kept = []
    for rel, attn in zip(rel_rows, attn_rows):
        positions = sorted(attn)
        if not positions:
            kept.append(set())
            continue
        values = [rel[i] for i in positions]
        low, high = min(values), max(values)
        score = {i: gamma * (rel[i] - low) / (high - low + 1e-8) + (1 - gamma) * attn[i] for i in positions}
        k = math.ceil(round(ratio * len(positions), 6))
        ranked = sorted(positions, key=lambda i: (-score[i], i))
        kept.append(set(ranked[:k]))
    return kept


def run_selection(selection, model, batch):
    """One training forward with the callback attached; returns (loss, kept positions per sample)."""
    grabbed = {}

    class Grab:
        def reshape_token_loss(self, ctx):
            grabbed["weights"] = ctx.weights.clone()

    selection.attach(model)
    grab = Grab()
    selection.dispatcher.add(grab)
    model.train()
    loss = model(**batch).loss
    selection.dispatcher.remove(grab)
    selection.detach()
    weights = grabbed["weights"]
    kept = [{t + 1 for t in range(weights.shape[1]) if weights[b, t] > 0} for b in range(weights.shape[0])]
    return loss, kept


def naive_loss(model, batch, kept):
    losses = naive_token_losses(model, batch)
    values = [losses[b][i] for b in range(len(kept)) for i in kept[b]]
    return sum(values) / len(values)


@pytest.mark.parametrize("model_type,left_pad,layer", [("llama", False, -1), ("qwen2", True, 0),
                                                       ("mistral", False, 1), ("gpt2", True, -1)])
def test_kept_set_and_loss_match_naive_formulas(model_type, left_pad, layer):
    model = build(model_type)
    base = copy.deepcopy(model)
    selection = TokenSelection(ratio=0.6, gamma=0.5, warmup=0, attention_layer=layer)
    selection.attach(model)  # the frozen copy is taken here, from the initial weights
    selection.detach()
    perturb(model)
    batch = make_batch(causal_lm_of(model).config.vocab_size, left_pad=left_pad)
    his, cur = naive_token_losses(base, batch), naive_token_losses(model, batch)
    rel = [{i: h[i] - c[i] for i in h} for h, c in zip(his, cur)]
    attn = naive_attention(model, batch, layer)
    expected = naive_select(rel, attn, 0.5, 0.6)
    loss, kept = run_selection(selection, model, batch)
    assert kept == expected
    assert [len(k) for k in kept] == [5, 2, 4, 3]  # ceil(0.6 * n)
    assert loss.item() == pytest.approx(naive_loss(model, batch, kept), rel=1e-5)


@pytest.mark.parametrize("gamma,mode", [(1.0, "loss"), (0.0, "attention")])
def test_gamma_extremes_reduce_to_single_signal_modes(gamma, mode):
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    mixed = TokenSelection(gamma=gamma, warmup=0)
    mixed.attach(model)
    mixed.detach()
    single = TokenSelection(mode=mode)
    single.attach(model)
    single.detach()
    perturb(model)
    loss_a, kept_a = run_selection(mixed, model, batch)
    loss_b, kept_b = run_selection(single, model, batch)
    assert kept_a == kept_b
    torch.testing.assert_close(loss_a, loss_b)
    # and each really is the single signal: compare with the naive selection of that signal alone
    attn = naive_attention(model, batch, -1)
    if mode == "attention":
        assert kept_b == naive_select([{i: 0.0 for i in a} for a in attn], attn, 0.0, 0.6)


def test_warmup_uses_attention_only_then_mixes():
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    selection = TokenSelection(gamma=0.5, warmup=3)
    attention_only = TokenSelection(mode="attention")
    selection.attach(model)
    selection.detach()
    perturb(model)
    selection.global_step = 2
    assert selection.current_gamma() == 0.0
    _, kept_warm = run_selection(selection, model, batch)
    _, kept_attn = run_selection(attention_only, model, batch)
    assert kept_warm == kept_attn
    selection.global_step = 3
    assert selection.current_gamma() == 0.5


def test_select_top_breaks_ties_by_position_and_handles_empty_rows():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5])
    response = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 1], [0] * 5]).bool()
    keep = select_top(scores, response, 0.6)
    assert keep.tolist() == [[True, True, True, False, False], [False] * 4 + [True], [False] * 5]
    assert keep_count(0.7, 10) == 7 and keep_count(0.6, 1) == 1 and keep_count(1.0, 0) == 0


def test_minmax_is_finite_for_constant_single_and_empty_rows():
    values = torch.tensor([[2.0, 2.0, 2.0], [5.0, 0.0, 0.0], [1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])
    response = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]]).bool()
    out = minmax_per_sample(values, response)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2], torch.tensor([0.0, 1.0, 0.5]), atol=1e-6, rtol=0)
    assert out[0].abs().max() < 1e-6 and out[1, 0] == 0 and out[3].abs().max() == 0


def test_rank_correlation_matches_naive_spearman():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    response = torch.ones(3, 9, dtype=torch.bool)
    response[1, 5:] = False
    expected = []
    for row in range(3):
        idx = response[row].nonzero().flatten()
        ra = a[row, idx].argsort().argsort().float()
        rb = b[row, idx].argsort().argsort().float()
        expected.append(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    torch.testing.assert_close(rank_correlation(a, b, response), torch.stack(expected).mean())
    assert torch.isnan(rank_correlation(a, b, torch.zeros_like(response)))


def test_edge_cases_no_nan():
    """Samples with 0 and 1 response tokens, a padding-only row and ties: finite loss, sane selection."""
    model = build("llama")
    ids = torch.randint(5, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0] = -100  # no response tokens
    labels[1, :7] = -100  # one response token (the last)
    mask[2] = 0  # padding only
    labels[2] = -100
    labels[3, :2] = -100
    ids[3, 2:] = ids[3, 2]  # repeated tokens: ties in both signals
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for mode in ("sstoken", "loss", "attention", "random"):
        selection = TokenSelection(mode=mode, warmup=0)
        loss, kept = run_selection(selection, model, batch)
        assert torch.isfinite(loss), mode
        assert [len(k) for k in kept] == [0, 1, 0, 4], mode
        # rank_corr is NaN when no sample has 2 varying tokens; it is then left out of the logs
        assert all(torch.isfinite(v) for k, v in selection.metrics.items() if k != "rank_corr")
    # a micro-batch without any response token: loss 0, not NaN
    empty = {**batch, "labels": torch.full_like(labels, -100)}
    loss, _ = run_selection(TokenSelection(warmup=0), model, empty)
    assert loss.item() == 0.0


def test_long_sequence_attention_is_chunked_and_matches_oracle(monkeypatch):
    from lightning_tokens.sstoken import attention

    monkeypatch.setattr(attention, "MAX_SCORES", 2 * 40 * 2 * 7)  # batch x length x 2 heads per key head: 7 queries
    model = build("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss, kept = run_selection(TokenSelection(mode="attention"), model, batch)
    attn = naive_attention(model, batch, -1)
    assert kept == naive_select([{i: 0.0 for i in a} for a in attn], attn, 0.0, 0.6)
    assert torch.isfinite(loss)


def naive_context_mass(query, key, attention_mask, context, scaling, softcap=None):
    """Per row, head and query: a float64 softmax over real keys up to the query and itself, summed over context."""
    batch, heads, length, _ = query.shape
    per_group = heads // key.shape[1]
    out = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for i in range(length):
            keys = [j for j in range(i + 1) if attention_mask[b, j] or j == i]
            total = 0.0
            for h in range(heads):
                logits = [float(query[b, h, i].double() @ key[b, h // per_group, j].double()) * scaling for j in keys]
                if softcap:
                    logits = [math.tanh(x / softcap) * softcap for x in logits]
                probs = torch.tensor(logits, dtype=torch.float64).softmax(0)
                total += sum(float(p) for p, j in zip(probs, keys) if context[b, j])
            out[b, i] = total / heads
    return out


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_context_attention_matches_naive_softmax(monkeypatch, softcap, chunk_rows):
    from lightning_tokens.sstoken import attention

    batch, heads, groups, length, dim = 3, 4, 2, 9, 8
    if chunk_rows:
        score_heads = heads if softcap else heads // groups
        monkeypatch.setattr(attention, "MAX_SCORES", batch * length * score_heads * chunk_rows)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.bfloat16)
    key = torch.randn(batch, groups, length, dim, generator=g, dtype=torch.bfloat16)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    context = torch.zeros_like(mask)
    context[0, :4], context[1, :2], context[2, 3:5] = 1, 1, 1
    got = attention.context_attention(query, key, mask, context, scaling=0.3, softcap=softcap)
    expected = naive_context_mass(query, key, mask, context, 0.3, softcap)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_random_mode_keeps_ceil_ratio_per_sample():
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    _, kept_a = run_selection(TokenSelection(mode="random", ratio=0.5), model, batch)
    _, kept_b = run_selection(TokenSelection(mode="random", ratio=0.5, seed=1), model, batch)
    assert [len(k) for k in kept_a] == [math.ceil(0.5 * n) for n in (7, 2, 6, 5)]
    assert kept_a != kept_b


def test_rho1_keeps_top_excess_loss_under_reference():
    spec = ModelSpec(config=tiny_config("llama"), seed=5)
    reference = causal_lm_of(load_causal_lm(spec)[0])
    model = build("llama")
    batch = make_batch(causal_lm_of(model).config.vocab_size)
    ref, cur = naive_token_losses(reference, batch), naive_token_losses(model, batch)
    excess = [{i: c[i] - r[i] for i in c} for c, r in zip(cur, ref)]
    expected = [set(sorted(e, key=lambda i: (-e[i], i))[:math.ceil(0.6 * len(e))]) for e in excess]
    _, kept = run_selection(TokenSelection(mode="rho1", reference=spec), model, batch)
    assert kept == expected


@pytest.mark.parametrize("kwargs,field", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(gamma=-0.1), "gamma"),
    (dict(mode="rho2"), "mode"), (dict(history="future"), "history"), (dict(history="precomputed"), "history_file"),
    (dict(mode="rho1"), "reference"), (dict(ema_decay=1.0), "ema_decay"), (dict(warmup=-1), "warmup"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TokenSelection.{field}"):
        TokenSelection(**kwargs)


def test_missing_layer_is_one_clear_error():
    model = build("llama")
    with pytest.raises(ValueError, match="attention_layer=2: the model has 2 decoder layers"):
        TokenSelection(attention_layer=2).attach(model)
    with pytest.raises(ValueError, match="attention_layer=-3"):
        TokenSelection(attention_layer=-3).attach(model)


def test_model_keeps_sdpa_and_probe_restores_config():
    model = build("llama")
    lm = causal_lm_of(model)
    batch = make_batch(lm.config.vocab_size)
    run_selection(TokenSelection(mode="attention"), model, batch)
    assert lm.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config is lm.config for layer in lm.model.layers)
    assert not lm._forward_hooks and not lm._forward_pre_hooks


def test_gradient_checkpointing_keeps_the_same_selection_and_gradients_flow():
    plain = build("llama")
    checkpointed, _ = load_causal_lm(ModelSpec(config=tiny_config("llama"), gradient_checkpointing=True))
    batch = make_batch(causal_lm_of(plain).config.vocab_size)
    loss_a, kept_a = run_selection(TokenSelection(mode="attention"), plain, batch)
    selection = TokenSelection(mode="attention")
    loss_b, kept_b = run_selection(selection, checkpointed, batch)
    assert kept_a == kept_b
    torch.testing.assert_close(loss_a, loss_b)
    loss_b.backward()
    assert all(p.grad is not None for p in checkpointed.parameters() if p.requires_grad)


# -- models whose attention the probe cannot recompute ---------------------------------------------------------------
COUNTING = "lightning_tokens_test_counting_sdpa"
_attention_calls: list = []


def _counting_sdpa(module, *args, **kwargs):
    _attention_calls.append(module)
    return sdpa_attention_forward(module, *args, **kwargs)


def last_attention_uses_the_interface(lm) -> bool:
    """Whether the last decoder layer reaches transformers' attention interface when the whole model is switched to
    a counting SDPA (the oracle: a full forward under another implementation, not the probe's per-module switch)."""
    AttentionInterface.register(COUNTING, _counting_sdpa)
    AttentionMaskInterface.register(COUNTING, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    previous, lm.config._attn_implementation = lm.config._attn_implementation, COUNTING
    _attention_calls.clear()
    try:
        with torch.no_grad():
            lm(input_ids=torch.arange(5, 11)[None])
    finally:
        lm.config._attn_implementation = previous
    return any(module is called for module in decoder_layers(lm)[-1].modules() for called in _attention_calls)


class StepCounter(pl.LightningModule):
    """A user's module that counts the training steps it starts (before its forward, which may raise)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.steps = net, 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("case,mode", [("falcon", "sstoken"), ("falcon", "attention"), ("falcon", "loss"),
                                       ("gptj", "sstoken"), ("bloom", "attention"), ("bloom", "loss")])
def test_a_model_the_attention_probe_cannot_reach_is_refused_in_setup(tmp_path, case, mode):
    net = causal_lm_of(load_causal_lm(spec_of(case))[0])
    module, before = StepCounter(net), copy.deepcopy(net.state_dict())
    # falcon and gptj use their own attention code in transformers 5.23 and the interface in 5.25
    refused = mode != "loss" and not last_attention_uses_the_interface(net)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[TokenSelection(mode=mode, ratio=0.5, warmup=0)])
    batch = make_batch(net.config.vocab_size)
    if refused:
        model_type = spec_of(case).config["model_type"]
        with pytest.raises(ValueError, match=f"on model type '{model_type}'.*mode='loss'"):
            trainer.fit(module, DataLoader([batch], batch_size=None))
        assert module.steps == 0  # refused before the first training step
    else:
        trainer.fit(module, DataLoader([batch], batch_size=None))
        assert module.steps == 1
        assert any(not torch.equal(p, before[name]) for name, p in net.state_dict().items())


@pytest.mark.parametrize("case", ["falcon", "gptj", "bloom", "mpt"])
def test_loss_mode_selects_by_excess_loss_on_any_attention(case):
    model = causal_lm_of(load_causal_lm(spec_of(case))[0])
    base = copy.deepcopy(model)
    selection = TokenSelection(ratio=0.6, mode="loss")
    selection.attach(model)  # the frozen copy is taken here, from the initial weights
    selection.detach()
    perturb(model)
    batch = make_batch(model.config.vocab_size)
    his, cur = naive_token_losses(base, batch), naive_token_losses(model, batch)
    rel = [{i: h[i] - c[i] for i in h} for h, c in zip(his, cur)]
    loss, kept = run_selection(selection, model, batch)
    assert kept == naive_select(rel, [{i: 0.0 for i in r} for r in rel], 1.0, 0.6)
    assert loss.item() == pytest.approx(naive_loss(model, batch, kept), rel=1e-5)


def test_the_setup_probe_forward_leaves_a_users_4bit_model_unpacked(tmp_path):
    """The probe's eval forward under no_grad runs before the dispatcher pins the 4-bit layers: it must pin them."""
    import bitsandbytes as bnb

    from lightning_tokens.quantization import bnb_config

    config = tiny_config("llama", hidden_size=64, intermediate_size=128)  # sizes bitsandbytes would repack
    load_causal_lm(ModelSpec(config=config))[0].save_pretrained(tmp_path)
    own = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config("nf4", torch.float32),
                                               device_map={"": "cpu"})
    layers = [m for m in own.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.support_avx512bf16_for_cpu for layer in layers)  # conftest: as on such a CPU
    TokenSelection(mode="attention").attach(own)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
