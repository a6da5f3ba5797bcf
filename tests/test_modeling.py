"""Model loading: tiny configs of every model type, LoRA, 4/8-bit QLoRA that trains on CPU, clear errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig, load_causal_lm
from lightning_tokens.data.encode import SFTCollator, encode_record
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.records import from_dicts
from lightning_tokens.modeling import causal_lm_of, decoder_layers, is_quantized
from tests.tiny import tiny_config


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
def test_each_model_type_builds_with_the_embedded_tokenizer(model_type, tokenizer):
    model, tok = load_causal_lm(ModelSpec(config=tiny_config(model_type)))
    assert model.config.model_type == model_type
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == len(tok)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tok(["Compute 1 + 2."], return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    assert len(decoder_layers(model)) == 2


def test_tiny_initialisation_is_seeded():
    first, _ = load_causal_lm(ModelSpec(config=tiny_config(), seed=3))
    second, _ = load_causal_lm(ModelSpec(config=tiny_config(), seed=3))
    other, _ = load_causal_lm(ModelSpec(config=tiny_config(), seed=4))
    a, b, c = (m.get_input_embeddings().weight for m in (first, second, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lora_trains_only_adapters():
    model, _ = load_causal_lm(ModelSpec(config=tiny_config(), lora={"r": 4, "lora_alpha": 8}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targets
    assert causal_lm_of(model).config.model_type == "llama"


def _batches(tokenizer, n=16, batch_size=8):
    records = from_dicts(ReasoningTask(num_train=n).records("train"), "t")
    samples = [(encode_record(tokenizer, r), None) for r in records]
    collate = SFTCollator(tokenizer.pad_token_id)
    return [collate(samples[i:i + batch_size]) for i in range(0, n, batch_size)]


@torch.no_grad()
def _mean_loss(module, batches):
    module.model.eval()
    losses = [module.model(**b).loss for b in batches]
    module.model.train()
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_training_lowers_the_loss_in_30_steps(quantization, tokenizer):
    # A frozen random base with the default 0.02 init bounds the logits too tightly for adapters to move
    # the loss much; a wider init gives the base (and so LoRA) room, as a pretrained model would.
    spec = ModelSpec(config=tiny_config(initializer_range=0.2), quantization=quantization, compute_dtype="float32",
                     lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0})
    module = CausalLMModule(model=spec,
                            optimizer=OptimizerConfig(name="adamw8bit", lr=1e-2, warmup=0, schedule="constant"))
    assert is_quantized(module.model)
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters()
              if not p.requires_grad and p.dtype != torch.uint8}
    batches = _batches(tokenizer)
    before = _mean_loss(module, batches)
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    after = _mean_loss(module, batches)
    assert after < before - 1.0, (before, after)
    for name, parameter in module.model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name


def test_fp4_loads_and_runs():
    model, tok = load_causal_lm(ModelSpec(config=tiny_config(), quantization="fp4", compute_dtype="float32",
                                          lora={"r": 2}))
    ids = tok(["Compute 3 + 4."], return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, tok = load_causal_lm(ModelSpec(config=tiny_config(), gradient_checkpointing=checkpointing))
        model.train()
        ids = tok(["Compute 12 + 34."], return_tensors="pt")["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_specs_get_clear_errors():
    with pytest.raises(ValueError, match="either 'name_or_path' or 'config'"):
        ModelSpec(name_or_path="x", config={"model_type": "llama"})
    with pytest.raises(ValueError, match="model_type"):
        ModelSpec(config={"hidden_size": 8})
    with pytest.raises(ValueError, match="ModelSpec.quantization"):
        ModelSpec(quantization="int4")
    with pytest.raises(ValueError, match="ModelSpec.dtype"):
        ModelSpec(dtype="float33")
    with pytest.raises(ValueError, match="add a 'lora' section"):
        load_causal_lm(ModelSpec(config=tiny_config(), quantization="nf4"))
    with pytest.raises(ValueError, match="flash_attention_2"):
        load_causal_lm(ModelSpec(config=tiny_config(), attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="ModelSpec.lora"):
        load_causal_lm(ModelSpec(config=tiny_config(), lora={"rank": 4}))
    with pytest.raises(ValueError, match="no tiny defaults"):
        load_causal_lm(ModelSpec(config={"model_type": "bert"}))


def test_peft_models_are_found_wherever_they_sit():
    from peft import LoraConfig, get_peft_model

    from lightning_tokens.modeling import is_peft_model, peft_model_of

    model, _ = load_causal_lm(ModelSpec(config=tiny_config()))
    assert peft_model_of(model) is None and not is_peft_model(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    holder = torch.nn.ModuleDict({"model": wrapped})  # as a LightningModule holds it
    assert peft_model_of(wrapped) is wrapped and peft_model_of(holder) is wrapped
    assert is_peft_model(wrapped) and is_peft_model(holder)
    assert not is_peft_model(wrapped.merge_and_unload())
