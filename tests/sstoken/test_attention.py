"""ssToken's attention signal (sstoken/attention.py): the context-attention mass against a naive softmax and eager
attention, chunking, the probe's layer index and config, gradient checkpointing, 4-bit models, and the refusal of
models whose attention the probe cannot reach."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from lightning_tokens.modeling import ModelSpec, causal_lm_of, decoder_layers, load_causal_lm
from lightning_tokens.sstoken import TokenSelection
from tests.integration.architectures import spec_of
from tests.sstoken.helpers import build, run_selection
from tests.sstoken.naive import make_batch, naive_attention, naive_select
from tests.tiny import tiny_config


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
