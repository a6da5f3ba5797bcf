"""The packed-forward check: once per model, a packed row must give a sample the hidden states it has alone; a model
that ignores packed position ids (Falcon) is refused with a PackingError instead of training on mixed samples."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from lightning_tokens.caft import MultiTokenHeadsModule
from lightning_tokens.data.encode import Encoded
from lightning_tokens.data.packing import PackedCollator, PackingError
from lightning_tokens.modeling import ModelSpec, decoder_of, load_causal_lm
from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher
from tests.tiny import tiny_config

FALCON = dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.0,
              attention_dropout=0.0)
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}  # dropout: the check must run without it
KINDS = {"full": {}, "lora": dict(lora=LORA), "nf4": dict(quantization="nf4", compute_dtype="float32", lora=LORA)}


def sample(length: int, seed: int) -> Encoded:
    ids = [random.Random(seed).randrange(3, 300) for _ in range(length)]
    return Encoded(ids, [-100] * 2 + ids[2:], 2, f"sample {seed}")


SAMPLES = [sample(9, 0), sample(7, 1), sample(6, 2), sample(10, 3)]


def packed(rows: list[list[int]]) -> dict:
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)([[SAMPLES[i] for i in row] for row in rows])
    batch.pop("use_cache")  # as a user's own collator might: the dispatcher turns the cache off itself
    return batch


def training_forward(model: torch.nn.Module, batch: dict):
    dispatcher, handler = TokenLossDispatcher.for_model(model), PlainLoss(keep_logits=True)
    dispatcher.add(handler)
    try:
        return model(**batch)
    finally:
        dispatcher.remove(handler)


def alone(model: torch.nn.Module, item: Encoded) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([item.input_ids])).logits[0]


def mixes_packed_samples(model: torch.nn.Module, batch: dict) -> bool:
    """Whether the first packed row's second sample gets other logits than it has alone (no dispatcher here):
    Falcon ignores packed position ids on transformers 5.23 and keeps the samples apart from 5.25 on."""
    with torch.no_grad():
        row = model.eval()(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                           use_cache=False).logits[0, 9:16]
    gap = (row - alone(model, SAMPLES[1])).abs().max().item()
    assert gap > 1e-2 or gap < 1e-4, gap  # either clearly mixed or equal up to rounding
    return gap > 1e-2


@pytest.mark.parametrize("alibi", [False, True], ids=["rotary", "alibi"])
def test_a_falcon_packed_forward_is_refused_naming_falcon_exactly_when_it_mixes_samples(alibi):
    model, _ = load_causal_lm(ModelSpec(config={**FALCON, "alibi": alibi}))
    batch = packed([[0, 1], [2, 3]])
    mixes = mixes_packed_samples(model, batch)
    model.train()
    if not mixes:
        training_forward(model, batch)  # this transformers keeps them apart: the check lets it train
        return
    with pytest.raises(PackingError, match="model type 'falcon' does not keep the samples of a packed row apart"):
        training_forward(model, batch)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_llama_packed_forward_passes_the_check_once(kind):
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(), **KINDS[kind]))
    model.train()
    calls: list[bool] = []  # the training mode of each forward of the decoder stack
    hook = decoder_of(model).register_forward_hook(lambda module, args, output: calls.append(module.training))
    batch = packed([[0, 1], [2, 3]])
    first = training_forward(model, batch)
    assert calls == [True, False, False]  # the training forward, then the check's two forwards without dropout
    assert all(module.training for module in model.modules())  # modes restored
    training_forward(model, batch)
    hook.remove()
    assert len(calls) == 4  # checked once per model
    assert torch.isfinite(first.loss)
    if kind == "full":  # every sample's logits are those it has alone
        logits, start = first.logits.detach(), 0
        for item in SAMPLES[:2]:
            torch.testing.assert_close(logits[0, start:start + len(item.input_ids)], alone(model, item),
                                       rtol=1e-4, atol=1e-5)
            start += len(item.input_ids)


def test_without_a_row_of_two_samples_the_check_waits_for_one():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config()))
    model.train()
    calls = []
    hook = decoder_of(model).register_forward_hook(lambda *args: calls.append(1))
    training_forward(model, packed([[0], [1]]))  # one sample per row, then padding: nothing to compare
    assert len(calls) == 1
    training_forward(model, packed([[0, 1], [2, 3]]))
    hook.remove()
    assert len(calls) == 4


def test_stage_one_heads_on_falcon_refuse_a_packed_batch_that_mixes_samples():
    module = MultiTokenHeadsModule(ModelSpec(config=FALCON), num_heads=2, heads_path=None)
    batch = PackedCollator(pad_token_id=0)([[SAMPLES[0], SAMPLES[1]]])
    mixes = mixes_packed_samples(module.model, batch)
    module.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        if not mixes:
            assert torch.isfinite(module.training_step(batch, 0))
            return
        with pytest.raises(PackingError, match="'falcon'"):
            module.training_step(batch, 0)
