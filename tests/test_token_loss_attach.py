"""Callbacks attach to the causal LM that trains, never silently to a frozen one, and say so when they cannot act."""

from __future__ import annotations

import copy
import re

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens import ConceptAwareFineTuning, TokenSelection
from lightning_tokens.token_loss import TokenLossCallback, find_causal_lm
from tests.token_loss_naive import VOCAB, hand_loss, make_batch


def tiny_lm(seed):
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


class Distillation(pl.LightningModule):
    """A user's module with a frozen teacher beside the student, registered first or second."""

    def __init__(self, teacher_first: bool, freeze_teacher: bool = True):
        super().__init__()
        teacher, student = tiny_lm(1), tiny_lm(2)
        if freeze_teacher:
            teacher.requires_grad_(False).eval()
        if teacher_first:
            self.teacher, self.student = teacher, student
        else:
            self.student, self.teacher = student, teacher
        self.seen = []

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = self.student(**batch).loss
        self.seen.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.0)


def fit(module, callbacks, steps=1):
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         accelerator="cpu")
    trainer.fit(module, train_dataloaders=DataLoader([make_batch()] * steps, batch_size=None))
    return trainer


class HalveEveryWeight(TokenLossCallback):
    """Toy handler with a visible effect: every target weighs 0.5 and a constant 1.0 is added."""

    def reshape_token_loss(self, ctx):
        ctx.weights = ctx.weights * 0.5
        ctx.extra_losses["one"] = torch.tensor(1.0)


@pytest.mark.parametrize("teacher_first", [True, False], ids=["teacher-first", "teacher-second"])
def test_callbacks_attach_to_the_student_whichever_is_registered_first(teacher_first):
    module = Distillation(teacher_first)
    assert find_causal_lm(module) is module.student
    _, plain = hand_loss(copy.deepcopy(module.student).train(), make_batch(), lambda mask: mask)
    fit(module, [HalveEveryWeight()])
    torch.testing.assert_close(module.seen[0], plain + 1.0)  # the student's loss was reshaped

    module = Distillation(teacher_first)
    trainer = fit(module, [TokenSelection(mode="random", ratio=0.5)])
    assert 0.4 < trainer.callback_metrics["selection/kept_fraction"] < 0.7
    assert not torch.allclose(module.seen[0], plain)

    module = Distillation(teacher_first)
    fit(module, [ConceptAwareFineTuning(num_heads=1, beta=1.0)])
    assert module.seen[0] > plain + 1e-3  # the heads' term was added to the student's loss
    head_layer, student_layer = module.caft_heads.blocks[0], module.student.model.layers[-1]
    assert torch.equal(head_layer.mlp.down_proj.weight, student_layer.mlp.down_proj.weight)  # built from the student


def test_two_trainable_causal_lms_raise_one_error_naming_both_and_model_attribute():
    module = Distillation(teacher_first=True, freeze_teacher=False)
    with pytest.raises(ValueError, match=r"'teacher' \(trainable\), 'student' \(trainable\).*model_attribute"):
        fit(module, [TokenSelection(mode="random")])
    fit(module, [TokenSelection(mode="random", model_attribute="student")])


def test_a_peft_student_is_named_by_its_own_attribute():
    from peft import LoraConfig, get_peft_model

    module = Distillation(teacher_first=True, freeze_teacher=False)
    module.student = get_peft_model(module.student, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"'student' \(trainable\)"):
        find_causal_lm(module)


class LogitsLoss(pl.LightningModule):
    """A user loop that computes its loss from the logits (no labels), or whose model stays in eval mode."""

    def __init__(self, eval_mode: bool = False, labels: bool = False):
        super().__init__()
        self.net = tiny_lm(3)
        if eval_mode:
            self.net.eval()  # as from_pretrained leaves it
        self.labels = labels

    def training_step(self, batch, batch_idx):
        if self.labels:
            return self.net(**batch).loss
        logits = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


CALLBACKS = {
    "generic": lambda: HalveEveryWeight(),
    "TokenSelection": lambda: TokenSelection(mode="random"),
    "ConceptAwareFineTuning": lambda: ConceptAwareFineTuning(num_heads=1),
}


@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize("case,expected", [
    ("no-labels", r"1 forward\(s\) of it had no labels: call it with labels="),
    ("eval-mode", r"1 forward\(s\) of it ran in eval mode: call model.train\(\)"),
], ids=["no-labels", "eval-mode"])
def test_a_callback_that_never_acts_warns_once_saying_why(callback, case, expected, recwarn):
    module = LogitsLoss(eval_mode=case == "eval-mode", labels=case == "eval-mode")
    fit(module, [CALLBACKS[callback]()], steps=3)
    inert = [str(w.message) for w in recwarn if "did nothing in the first training batch" in str(w.message)]
    assert len(inert) == 1, inert
    assert type(CALLBACKS[callback]()).__name__ in inert[0] and "LlamaForCausalLM" in inert[0]
    assert re.search(expected, inert[0]), inert[0]


def test_a_callback_that_acts_does_not_warn(recwarn):
    fit(LogitsLoss(labels=True), [HalveEveryWeight()], steps=2)
    assert not [w for w in recwarn if "did nothing" in str(w.message)]


def test_a_callback_on_a_model_the_loop_never_calls_says_so(recwarn):
    module = LogitsLoss(labels=True)
    module.spare = tiny_lm(4)  # never called
    fit(module, [HalveEveryWeight(model_attribute="spare")], steps=2)
    inert = [str(w.message) for w in recwarn if "did nothing" in str(w.message)]
    assert len(inert) == 1 and "no forward of it ran in the batch" in inert[0] and "model_attribute" in inert[0]
