"""ConceptAwareFineTuning on a model's own MTP layers in real Trainer runs: a user's module against transformers'
``MtpModel``, trained layers under LoRA exported merged, an nf4 base."""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import MtpModel

from lightning_tokens.caft import ConceptAwareFineTuning, MultiTokenHeads
from lightning_tokens.caft.mtp import export_mtp
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.sft import CausalLMModule
from tests.caft.builders import UserModule, user_batch
from tests.tiny import tiny_config, trainer


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def task_data():
    return SFTDataModule(task=ReasoningTask(num_train=16, num_val=8), max_length=64, batch_size=4)


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny deepseek_v3 checkpoint on disk carrying two trained-looking MTP layers."""
    model, tokenizer = load_causal_lm(ModelSpec(config=tiny_config("deepseek_v3", initializer_range=0.2)))
    heads = MultiTokenHeads(model, num_heads=2, architecture="mtp")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    export_mtp(model, heads, tmp_path / "base", tokenizer=tokenizer)
    return tmp_path / "base", heads


def naive_caft_loss(model, mtp: MtpModel, batch, beta, gamma, s):
    """CE_0 + sum_k beta gamma^k s CE_k: the main loss from full logits, CE_k from transformers' MtpModel layers run
    over the right-padded batch (every scored position and what it reads are real tokens)."""
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
        vocab = out.logits.shape[-1]
        total = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
        previous, length = out.hidden_states[-1], ids.shape[1]
        for i in range(len(mtp.layers)):
            k = i + 1
            positions = torch.arange(k, length)[None].expand(ids.shape[0], -1)
            previous = mtp.forward_layer(i, previous[:, : length - k], positions, None, input_ids=ids[:, k:])
            logits = mtp._project_to_logits(previous[:, :-1]).float()
            ce = F.cross_entropy(logits.reshape(-1, vocab), labels[:, k + 1:].reshape(-1), ignore_index=-100)
            total = total + beta * gamma ** k * s * ce
    return total


@pytest.mark.parametrize("keep_logits", [False, True])
def test_caft_on_the_checkpoints_own_mtp_layers_in_a_user_module(checkpoint, keep_logits):
    path, written = checkpoint
    module = UserModule(AutoModelForCausalLM.from_pretrained(path).train())  # from_pretrained gives eval mode
    reference = copy.deepcopy(module.net).eval()
    mtp = MtpModel(reference, 2).eval()
    mtp.layers.load_state_dict(written.blocks.state_dict())
    batch = user_batch(module.net.config.vocab_size)
    # no heads_path, no stage 1; with keep_logits the depths read the output head's input instead of ctx.hidden
    callback = ConceptAwareFineTuning(architecture="mtp", num_heads=None, beta=0.5, keep_logits=keep_logits)
    run = trainer(max_steps=2, log_every_n_steps=1, callbacks=[callback])
    run.fit(module, DataLoader([batch, batch], batch_size=None))
    for name, tensor in module.caft_heads.state_dict().items():  # the checkpoint's own layers, frozen
        assert torch.equal(tensor, written.state_dict()[name]), name
    assert not any(p.requires_grad for p in module.caft_heads.parameters())
    for step, seen in enumerate(module.seen):
        s = math.sin(math.pi / 2 * (1 - step / 2))
        torch.testing.assert_close(seen, naive_caft_loss(reference, mtp, batch, 0.5, 0.8, s))
    assert {"train/caft_head1_loss", "train/caft_head2_acc"} <= set(run.logged_metrics)


def test_trained_mtp_layers_under_lora_export_merged_in_the_native_layout(checkpoint, tmp_path):
    path, written = checkpoint
    spec = ModelSpec(name_or_path=str(path), lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                   "target_modules": ["q_proj", "o_proj"]})
    module = CausalLMModule(model=spec, optimizer=OptimizerConfig(lr=1e-2, warmup=0), max_new_tokens=0)
    callback = ConceptAwareFineTuning(architecture="mtp", num_heads=None, train_heads=True, beta=1.0)
    trainer(max_steps=2, callbacks=[callback]).fit(module, datamodule=task_data())
    trained = module.caft_heads
    assert any(not torch.equal(t, written.state_dict()[n]) for n, t in trained.state_dict().items())

    export_mtp(module.model, trained, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    again = MultiTokenHeads.from_model(loaded)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    module.model.eval()
    with torch.no_grad():  # the adapters are merged into the written weights
        torch.testing.assert_close(loaded(ids).logits, module.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_caft_mtp_trains_on_an_nf4_base(checkpoint):
    path, _ = checkpoint
    spec = ModelSpec(name_or_path=str(path), quantization="nf4",
                     lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "o_proj"]})
    module = CausalLMModule(model=spec, optimizer=OptimizerConfig(lr=1e-2, warmup=0), max_new_tokens=0)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    before = [p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n]
    callback = ConceptAwareFineTuning(architecture="mtp", num_heads=3, beta=1.0)
    run = trainer(max_steps=2, log_every_n_steps=1, callbacks=[callback, Record()])
    run.fit(module, datamodule=task_data())
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, p.detach()) for a, (n, p) in
               zip(before, [(n, p) for n, p in module.named_parameters() if "lora_B" in n]))
    assert module.caft_heads.num_heads == 3  # depth 3 starts as a copy of the checkpoint's depth 2
    assert torch.equal(module.caft_heads.blocks[2].eh_proj.weight, module.caft_heads.blocks[1].eh_proj.weight)
    assert math.isfinite(float(run.logged_metrics["train/caft_head3_loss"]))
