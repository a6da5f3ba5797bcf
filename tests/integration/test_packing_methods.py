"""Every method on packed batches: the same per-sample decisions, losses and gradients as the samples padded."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens.data.packing import PackedCollator, PackingError, batch_is_packed, real_tokens, segment_ids
from tests.integration.packed_samples import ROWS, SAMPLES, packed, padded
from tests.lean_loss_naive import (
    KINDS,
    assert_same_gradients,
    caft_on,
    gradients,
    load,
    naive_caft_loss,
    selected_step,
)


def per_sample(mask: torch.Tensor, batch: dict) -> list[list[int]]:
    """The ``(B, T - 1)`` prediction mask as, for every sample in SAMPLES order, the positions it marks within the
    sample (prediction ``t`` predicts token ``t + 1``; positions counted from the sample's first token)."""
    result: dict[int, list[int]] = {}
    if "position_ids" in batch:
        segments = segment_ids(batch["position_ids"])
        for r, row in enumerate(ROWS):
            for number, index in enumerate(row):
                start = int((segments[r] == number).nonzero()[0])
                result[index] = [int(t) - start for t in mask[r].nonzero().view(-1) if segments[r, t + 1] == number]
    else:
        for i in range(len(SAMPLES)):
            start = int(batch["attention_mask"][i].nonzero()[0])
            result[i] = [int(t) - start for t in mask[i].nonzero().view(-1)]
    return [result[i] for i in range(len(SAMPLES))]


def selection_run(kind: str, batch: dict, mode: str) -> tuple:
    from lightning_tokens import TokenSelection

    model = load(kind)
    selection = TokenSelection(warmup=0, ratio=0.5, mode=mode)
    selection.attach(model)
    if kind == "full":  # move the model away from its frozen history copy, so REL is not zero
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    loss, kept = selected_step(selection, model, batch)
    return loss.detach(), per_sample(kept, batch), gradients(model), selection.metrics


@pytest.mark.parametrize("mode", ["sstoken", "attention", "loss"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_token_selection_selects_each_packed_sample_as_if_padded(kind, side, mode):
    loss_padded, kept_padded, grads_padded, stats_padded = selection_run(kind, padded(SAMPLES, side), mode)
    loss_packed, kept_packed, grads_packed, stats_packed = selection_run(kind, packed(SAMPLES), mode)
    targets = [sum(label != -100 for label in s.labels[1:]) for s in SAMPLES]
    assert [len(k) for k in kept_packed] == [-(-n // 2) for n in targets]  # ceil(0.5 n) per sample, not per row
    assert kept_packed == kept_padded
    torch.testing.assert_close(loss_packed, loss_padded, rtol=0, atol=1e-5)
    for name in ("loss_history", "rel", "attention", "rank_corr"):
        if name in stats_padded:
            torch.testing.assert_close(stats_packed[name], stats_padded[name], rtol=0, atol=1e-5)
    assert_same_gradients(grads_packed, grads_padded)


def caft_run(kind: str, batch: dict, architecture: str, naive_batch: dict | None = None) -> tuple:
    model, holder, caft = caft_on(kind, architecture)
    loss = model(**batch).loss
    loss.backward()
    grads = gradients(holder)
    caft.teardown(None, holder, "fit")
    naive = None
    if naive_batch is not None:
        holder.zero_grad()
        naive = naive_caft_loss(model, holder.caft_heads, naive_batch, 0.5, 0.8, caft.schedule_weight)
        naive.backward()
        naive = (naive.detach(), gradients(holder))
    return loss.detach(), grads, caft._last, naive


@pytest.mark.parametrize("architecture", ["layer", "resblock"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_caft_heads_never_predict_across_a_boundary(kind, architecture):
    """Packed CAFT equals an independent full-logits computation on the same samples right-padded."""
    right = padded(SAMPLES, "right")
    loss, grads, logged, (naive_loss, naive_grads) = caft_run(kind, packed(SAMPLES), architecture, right)
    torch.testing.assert_close(loss, naive_loss, rtol=0, atol=1e-5)
    assert_same_gradients(grads, naive_grads)
    assert any(name.startswith("caft_heads.") for name in grads)
    # and head by head, as logged, against the same samples left-padded
    _, _, logged_left, _ = caft_run(kind, padded(SAMPLES, "left"), architecture)
    for k in (1, 2):
        torch.testing.assert_close(logged[f"caft_head{k}_loss"], logged_left[f"caft_head{k}_loss"], rtol=0, atol=1e-5)
        torch.testing.assert_close(logged[f"caft_head{k}_acc"], logged_left[f"caft_head{k}_acc"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_plain_sft_packed_loss_and_gradients_equal_padded(kind):
    from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher

    results = []
    for batch in (padded(SAMPLES, "left"), packed(SAMPLES)):
        model = load(kind)
        handler = PlainLoss()
        TokenLossDispatcher.for_model(model).add(handler)
        loss = model(**batch).loss
        loss.backward()
        TokenLossDispatcher.for_model(model).remove(handler)
        results.append((loss.detach(), gradients(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    assert_same_gradients(results[1][1], results[0][1])


class UserModule(pl.LightningModule):
    """A user's own module; ``by_name`` picks the keys a padded batch has, as much user code does."""

    def __init__(self, by_name: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        from lightning_tokens.data.tokenizer import load_task_tokenizer
        from tests.tiny import tiny_config

        self.tokenizer = load_task_tokenizer()
        torch.manual_seed(0)
        config = AutoConfig.for_model(**tiny_config(vocab_size=len(self.tokenizer)))
        self.model = AutoModelForCausalLM.from_config(config)
        self.by_name = by_name

    def training_step(self, batch, batch_idx):
        if self.by_name:
            return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.01)


def packed_data(**overrides):
    from lightning_tokens import ReasoningTask, SFTDataModule

    task = ReasoningTask(num_train=48, num_val=0, max_digits=3, max_operands=3, style="mixed")
    return SFTDataModule(task=task, batch_size=2, max_length=256, packing=True, val_fraction=0, **overrides)


def trainer(steps, **kwargs):
    return pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, accelerator="cpu", **kwargs)


def test_a_user_module_trains_on_packed_batches_and_one_dropping_their_position_ids_fails_clearly():
    from lightning_tokens import TokenSelection

    module = UserModule()
    trainer(2, enable_checkpointing=False, callbacks=[TokenSelection(mode="attention")]).fit(module, packed_data())
    assert module.trainer.callback_metrics["selection/kept_fraction"] > 0
    with pytest.raises(PackingError, match="without its position_ids"):
        trainer(1, enable_checkpointing=False, callbacks=[TokenSelection(mode="attention")]).fit(
            UserModule(by_name=True), packed_data())


def test_packed_batches_are_deterministic_and_resume_mid_epoch(tmp_path):
    """The packed loader's batches depend on the seed alone, and a run resumed mid-epoch sees the rest of them
    (weights and metrics of a resumed packed run: tests/cli/test_lightning_cli.py)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_tokens import CausalLMModule
    from lightning_tokens.modeling import ModelSpec
    from tests.tiny import tiny_config

    class Recorder(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(batch["input_ids"].clone())

    def run(steps, ckpt_path=None, **kwargs):
        module = CausalLMModule(model=ModelSpec(config=tiny_config()), max_new_tokens=0, generation_batches=0)
        recorder = Recorder()
        fit = trainer(steps, callbacks=[recorder, *kwargs.pop("callbacks", [])], **kwargs)
        fit.fit(module, packed_data(), ckpt_path=ckpt_path)
        return recorder.seen, module

    straight, _ = run(6, enable_checkpointing=False)
    rows = packed_data()
    rows.setup("fit")
    assert len(rows.train_dataloader()) > 6  # the interruption below falls inside the first epoch
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_last=True)
    first, _ = run(3, callbacks=[checkpoint])
    resumed, _ = run(6, ckpt_path=str(tmp_path / "last.ckpt"), enable_checkpointing=False)
    assert len(first) == 3 and len(resumed) == 3
    for a, b in zip(straight, first + resumed):
        assert torch.equal(a, b)


# -- Quiet-STaR and the budget predictor ------------------------------------------------------------------
def quiet_star_module(model_type: str, lora: bool):
    from lightning_tokens import QuietSTaRModule
    from lightning_tokens.modeling import ModelSpec
    from tests.tiny import tiny_config

    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if model_type == "gpt2" else {}
    spec = ModelSpec(config=tiny_config(model_type, **no_dropout), lora=LORA if lora else None)
    torch.manual_seed(0)  # the mixing head and thought embeddings start from the global generator
    module = QuietSTaRModule(spec, thought_length=2, n_ahead_talk=3, n_thoughts=2, policy_weight=1.0)
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero mixing head, so the mixed prediction differs from the base one
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    return module


LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.mark.parametrize("think_at", ["all", 1.0])
@pytest.mark.parametrize("train_on", ["all", "labels"])
@pytest.mark.parametrize("model_type,lora", [("llama", False), ("gpt2", False), ("qwen2", True)])
def test_quiet_star_thinks_about_each_packed_sample_alone(model_type, lora, train_on, think_at):
    """Greedy thoughts (temperature 0) make the passes deterministic: every term and gradient then matches (with
    ``think_at=1.0`` a packed row thinks at its samples' candidate positions alone, and every one of them)."""
    results = []
    for batch in (padded(SAMPLES, "right"), packed(SAMPLES)):
        module = quiet_star_module(model_type, lora)
        module.train_on, module.think_at = train_on, think_at
        module.train()
        out = module.quiet_star(batch["input_ids"], batch.get("attention_mask"), batch["labels"], temperature=0.0,
                                position_ids=batch.get("position_ids"))
        out.loss.backward()
        results.append((out.metrics(), gradients(module)))
    (padded_terms, padded_grads), (packed_terms, packed_grads) = results
    for name in ("loss", "base_nll", "mixed_nll", "mixing_weight", "reward"):
        torch.testing.assert_close(packed_terms[name], padded_terms[name], rtol=0, atol=1e-5, msg=name)
    assert_same_gradients(packed_grads, padded_grads)


def test_budget_predictor_sees_each_packed_trace_alone(tmp_path):
    from lightning_tokens import BudgetPredictorModule, TraceDataModule
    from lightning_tokens.budget.data import collate_traces
    from lightning_tokens.modeling import ModelSpec
    from tests.tiny import tiny_config

    module = BudgetPredictorModule(ModelSpec(config=tiny_config("llama")))
    traces = TraceDataModule(packing=True, max_length=256, batch_size=2)
    traces.tokenizer = module.tokenizer
    traces.setup("fit")
    rows = traces.train_dataloader().dataset
    row_samples = [rows[0], rows[1]]
    assert all(len(row) > 1 for row in row_samples)
    packed_batch = PackedCollator(module.tokenizer.pad_token_id, fields=("remaining",))(row_samples)
    padded_batch = collate_traces([s for row in row_samples for s in row], module.tokenizer.pad_token_id)
    nll_packed, alpha_packed, _, length_packed = module.step(packed_batch)
    nll_padded, alpha_padded, _, length_padded = module.step(padded_batch)
    assert nll_packed.numel() > 0
    torch.testing.assert_close(length_packed, length_padded)
    torch.testing.assert_close(nll_packed, nll_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha_packed, alpha_padded, rtol=1e-5, atol=1e-5)


# -- precomputed history, and resuming the loaders of every data module ---------------------------------------
def test_precomputed_history_of_packed_batches_equals_that_of_padded_ones():
    """``lightning-tokens score`` on packed batches writes the table it writes on padded ones, and the table
    gives every sample of a packed row its own losses (TokenSelection(history="precomputed"))."""
    from lightning_tokens.sstoken.precompute import score_dataloader

    model = load("full")
    cpu = torch.device("cpu")
    from_padded = score_dataloader(model, [padded(SAMPLES, "left")], cpu)
    from_packed = score_dataloader(model, [packed(SAMPLES)], cpu)
    assert sorted(from_padded.index) == sorted(from_packed.index) and len(from_packed.index) == len(SAMPLES)
    for key, (offset, length) in from_padded.index.items():
        other, other_length = from_packed.index[key]
        assert length == other_length
        torch.testing.assert_close(from_packed.flat[other:other + length], from_padded.flat[offset:offset + length],
                                   rtol=0, atol=1e-5)
    batch = packed(SAMPLES)
    segments = segment_ids(batch["position_ids"])
    looked_up = from_padded.lookup(batch["input_ids"], real_tokens(segments), batch["labels"], segments)
    left = padded(SAMPLES, "left")
    expected = from_padded.lookup(left["input_ids"], left["attention_mask"], left["labels"])
    targets = batch["labels"][:, 1:] != -100
    assert per_sample(targets & (looked_up != 0), batch) == per_sample((left["labels"][:, 1:] != -100), left)
    assert torch.equal(looked_up[targets].sort().values, expected[left["labels"][:, 1:] != -100].sort().values)


def every_packed_loader():
    """A packed training loader of each data module, on the embedded task."""
    from lightning_tokens import PlainTextDataModule, ReasoningTask, TraceDataModule

    task = ReasoningTask(num_train=40, num_val=4)
    plain = PlainTextDataModule(task=task, batch_size=2, max_length=128, packing=True)
    traces = TraceDataModule(task=ReasoningTask(num_train=40, num_val=4, style="mixed"), batch_size=2,
                             max_length=256, packing=True)
    for data in (packed_data(), plain, traces):
        data.setup("fit")
        yield type(data).__name__, data.train_dataloader


@pytest.mark.parametrize("name,loader", list(every_packed_loader()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_packed_loader_is_deterministic_and_resumes_mid_epoch(name, loader):
    first = list(loader())
    assert len(first) >= 4 and all(batch_is_packed(batch) for batch in first[:3]), name
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches_done": 3})
    rest = list(resumed)
    assert len(rest) == len(first) - 3
    for a, b in zip(first[3:], rest):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])
    again = list(loader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))


def test_validation_on_packed_batches_reports_the_padded_loss():
    """Validation loaders stay padded; one of your own that packs reports the same ``val/loss``."""
    from torch.utils.data import DataLoader

    from lightning_tokens import CausalLMModule
    from lightning_tokens.modeling import ModelSpec
    from tests.tiny import tiny_config

    losses = []
    for batch in (padded(SAMPLES, "right"), packed(SAMPLES)):
        module = CausalLMModule(model=ModelSpec(config=tiny_config()), max_new_tokens=0)
        validator = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        metrics = validator.validate(module, DataLoader([batch], batch_size=None), verbose=False)
        losses.append(metrics[0]["val/loss"])
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
