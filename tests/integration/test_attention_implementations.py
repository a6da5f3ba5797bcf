"""Attention implementations: ModelSpec's automatic choice and its refusals, and the methods on models whose layers
take arguments of their own or whose attention bypasses transformers' attention interface (Falcon)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens import modeling
from lightning_tokens.caft import MultiTokenHeads, capture_trunk
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from lightning_tokens.quiet_star import QuietSTaRModule
from lightning_tokens.quiet_star.parallel import check_supported
from tests.tiny import padded_rows

LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
GEMMA2 = dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8)
# Falcon-7B's layout (rotary positions, one kv head, parallel attention) and the ALiBi variant of Falcon-RW.
FALCON = dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.0,
              attention_dropout=0.0)
FALCON_ALIBI = dict(FALCON, alibi=True)
GPT_OSS = dict(model_type="gpt_oss", hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture
def fresh_reports(monkeypatch):
    """Forget which (model type, implementation) pairs were logged, so that this test sees its own."""
    monkeypatch.setattr(modeling, "_reported_attention", set())


def test_the_default_is_automatic():
    assert ModelSpec().attn_implementation is None


def test_automatic_choice_takes_sdpa_where_supported_and_eager_for_gemma2(caplog, fresh_reports):
    with caplog.at_level(logging.INFO):
        llama, _ = load_causal_lm(ModelSpec(config=LLAMA))
        gemma2, _ = load_causal_lm(ModelSpec(config=GEMMA2))
        load_causal_lm(ModelSpec(config=GEMMA2, seed=1))  # same model type: not logged again
    assert llama.config._attn_implementation == "sdpa"
    assert gemma2.config._attn_implementation == "eager"
    # transformers itself refuses SDPA for Gemma 2: the automatic choice is not a preference of ours
    config = AutoConfig.for_model(**{**GEMMA2, "vocab_size": 64})
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    messages = [r.getMessage() for r in caplog.records if "runs attn_implementation" in r.getMessage()]
    assert sum("'llama'" in m and "'sdpa'" in m for m in messages) == 1
    assert sum("'gemma2'" in m and "'eager'" in m for m in messages) == 1, messages


def test_an_explicit_implementation_is_honoured(caplog, fresh_reports):
    with caplog.at_level(logging.INFO):
        model, _ = load_causal_lm(ModelSpec(config=LLAMA, attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"
    assert any("'eager' (as requested)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("requested", ["sdpa", "spda"])
def test_an_unsupported_implementation_is_refused_naming_what_the_model_supports(requested):
    with pytest.raises(ValueError) as error:
        load_causal_lm(ModelSpec(config=GEMMA2, attn_implementation=requested))
    message = str(error.value)
    assert message.startswith(f"ModelSpec.attn_implementation {requested!r}") and "'gemma2'" in message
    supported = message.split("supports ", 1)[1]
    assert "'eager'" in supported and "'sdpa'" not in supported


def test_a_non_string_implementation_is_refused():
    with pytest.raises(ValueError, match="ModelSpec.attn_implementation must be a string"):
        ModelSpec(attn_implementation=2)


# -- CAFT layer heads ------------------------------------------------------------------------------------------------
def test_layer_heads_on_falcon_reproduce_its_last_layer_with_padding():
    # Falcon's decoder layer requires ``alibi`` (None without ALiBi); a fresh head, a copy of the last layer fed its
    # input, must give the model's own logits on every real position, right and left padded rows alike.
    model, _ = load_causal_lm(ModelSpec(config=FALCON))
    model.eval()
    heads = MultiTokenHeads(model, num_heads=2).eval()
    from transformers.models.falcon.modeling_falcon import FalconDecoderLayer

    alibi = inspect.signature(FalconDecoderLayer.forward).parameters.get("alibi")
    assert heads.unused_arguments == (("alibi",) if alibi is not None and alibi.default is alibi.empty else ())
    ids, mask = padded_rows([[5, 9, 14, 3, 22, 8, 17], [7, 4, 30, 12]], width=7, side="right")
    left_ids, left_mask = padded_rows([[6, 11, 2, 19, 25]], width=7, side="left")
    ids, mask = torch.cat([ids, left_ids]), torch.cat([mask, left_mask])
    with torch.no_grad(), capture_trunk(model) as holder:
        logits = model(input_ids=ids, attention_mask=mask).logits
        head_logits = heads(model, holder["trunk"], mask)
    real = mask.bool()
    for item in head_logits:
        torch.testing.assert_close(item[real], logits[real], rtol=1e-4, atol=1e-5)


def test_layer_heads_refuse_falcon_with_alibi_at_construction_and_resblocks_run():
    model, _ = load_causal_lm(ModelSpec(config=FALCON_ALIBI))
    with pytest.raises(ValueError, match="model type 'falcon' take '(alibi|attention_mask)' with a position bias"
                                         ".*architecture='resblock'"):
        MultiTokenHeads(model, num_heads=2)
    heads = MultiTokenHeads(model, num_heads=2, architecture="resblock")
    with torch.no_grad():  # W starts at zero; with b at zero too, x + SiLU(W x + b) is the identity
        for block in heads.blocks:
            block.linear.bias.zero_()
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad(), capture_trunk(model) as holder:
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        head_logits = heads(model, holder["trunk"])
        # the last layer's input through the final norm and lm_head
        expected = model.lm_head(model.transformer.ln_f(states[-2]))
    for item in head_logits:
        torch.testing.assert_close(item, expected, rtol=1e-4, atol=1e-5)


# -- Quiet-STaR --------------------------------------------------------------------------------------------------------
def falcon_calls_the_attention_interface() -> bool:
    """Whether this transformers' Falcon attention goes through the attention interface (5.25 does, 5.23 does not)."""
    from transformers.models.falcon import modeling_falcon

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_falcon.FalconAttention.forward)


@pytest.mark.parametrize("config", [FALCON, FALCON_ALIBI], ids=["falcon", "falcon-alibi"])
def test_quiet_star_refuses_attention_outside_the_interface_at_construction(config):
    if falcon_calls_the_attention_interface():
        pytest.skip("this transformers' Falcon attention goes through the attention interface")
    with pytest.raises(ValueError, match="model type 'falcon' does not go through transformers' attention interface "
                                         r"in decoder layers \[0, 1\]"):
        QuietSTaRModule(ModelSpec(config=config), n_thoughts=1, thought_length=1, n_ahead_talk=1)


def test_quiet_star_refuses_alibi_added_to_the_mask_of_the_attention_interface():
    if not falcon_calls_the_attention_interface():
        pytest.skip("this transformers' Falcon attention does not go through the attention interface")
    QuietSTaRModule(ModelSpec(config=FALCON), n_thoughts=1, thought_length=1, n_ahead_talk=1)
    with pytest.raises(ValueError, match=r"model type 'falcon' uses a bias added to its attention mask \(ALiBi\)"):
        QuietSTaRModule(ModelSpec(config=FALCON_ALIBI), n_thoughts=1, thought_length=1, n_ahead_talk=1)


def test_quiet_star_takes_soft_capped_attention_and_refuses_attention_sinks():
    # Gemma 2 soft-caps its attention scores, which the thought attention applies
    # (tests/quiet_star/test_parallel_families.py); gpt-oss's sinks it would silently leave out.
    QuietSTaRModule(ModelSpec(config=GEMMA2), n_thoughts=1, thought_length=1, n_ahead_talk=1)
    with pytest.raises(ValueError, match=r"model type 'gpt_oss' uses attention sinks \(s_aux\)"):
        QuietSTaRModule(ModelSpec(config=GPT_OSS), n_thoughts=1, thought_length=1, n_ahead_talk=1)


def test_the_interface_probe_runs_once_per_model_and_leaves_the_implementation():
    model, _ = load_causal_lm(ModelSpec(config=LLAMA))
    calls = []
    hook = modeling.decoder_of(model).register_forward_hook(lambda *args: calls.append(1))
    check_supported(model)
    check_supported(model)
    hook.remove()
    assert len(calls) == 1
    assert model.config._attn_implementation == "sdpa"
