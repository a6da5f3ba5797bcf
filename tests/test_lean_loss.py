"""The lean per-token loss: the same loss and gradients as full logits, without ever building them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens.lean_loss import LogitPost, OutputProjection, UnsupportedLogits, chunked_cross_entropy
from lightning_tokens.token_loss import LogitsNotKept, PlainLoss, TokenLossDispatcher
from tests.lean_loss_naive import KINDS, Kept, assert_same_gradients, caft_on, gradients, load, naive_caft_loss
from tests.tiny import padded_rows, tiny_config

VOCAB = 97
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def build(model_type="llama", tie=False, **overrides):
    options = {**tiny_config(model_type, vocab_size=VOCAB, tie_word_embeddings=tie), **NO_DROPOUT.get(model_type, {}),
               **overrides}
    config = AutoConfig.for_model(**options)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def batch(side="right"):
    rows = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38, 32, 79, 50, 28],
            [8, 41, 97 - 1, 9, 71, 69, 39, 9]]
    ids, mask = padded_rows(rows, 12, side)
    labels = ids.clone()
    labels[mask == 0] = -100
    for i, row in enumerate(rows):  # the first three real tokens of each row are its prompt
        start = 0 if side == "right" else 12 - len(row)
        labels[i, start:start + 3] = -100
    return ids, mask, labels


def position_weights(shape):
    return torch.arange(1, shape[1] + 1, dtype=torch.float32).expand(shape) / 5


def naive_loss(model, ids, mask, labels, weighted):
    """Full logits from a forward without labels, then a per-token cross-entropy by hand."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    weights = (labels[:, 1:] != -100).float()
    if weighted:
        weights = weights * position_weights(weights.shape)
    return (losses * weights).sum() / weights.sum()


class Weighted:
    """A handler weighting position t by (t + 1) / 5, reading ``ctx.token_loss`` or not."""

    def __init__(self, weighted=True, reads=False, keep_logits=False):
        self.weighted, self.reads, self.keep_logits = weighted, reads, keep_logits

    def reshape_token_loss(self, ctx):
        if self.reads:
            assert ctx.token_loss.shape == ctx.target_mask.shape
        if self.weighted:
            ctx.weights = ctx.weights * position_weights(ctx.weights.shape)


def rows_through_head(model):
    """Record how many positions every call of the output head projects."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[:-1].numel()))
    return seen


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("reads", [False, True], ids=["fused", "per-token"])
def test_loss_and_gradients_equal_those_of_full_logits(model_type, tie, side, reads):
    model = build(model_type, tie)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    ids, mask, labels = batch(side)
    expected = naive_loss(model, ids, mask, labels, weighted=True)
    expected.backward()
    expected_grads = gradients(model)
    model.zero_grad()

    handler = Weighted(reads=reads)
    TokenLossDispatcher.for_model(model).add(handler)
    head_rows = rows_through_head(model)
    for _ in range(2):  # the first forward also checks the projection on the last position
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
        assert_same_gradients(gradients(model), expected_grads)
    # Never a (B, T, V) projection: the first forward's head sees the last two positions (2B rows, checked against
    # the reproduction, which projects them again, and scored by the model's own loss), later ones no position.
    assert max(head_rows) == 2 * ids.shape[0] and head_rows[-1] == 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_plain_loss_equals_transformers_own(model_type):
    model = build(model_type)
    ids, mask, labels = batch("left")
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    expected_grads = gradients(model)
    model.zero_grad()
    TokenLossDispatcher.for_model(model).add(PlainLoss())
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    assert_same_gradients(gradients(model), expected_grads)


def test_chunks_of_every_size_give_the_same_rows():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 40)
    rows, targets = torch.randn(23, 16, requires_grad=True), torch.randint(0, 40, (23,))
    projection = OutputProjection.__new__(OutputProjection)
    projection.head, projection.post = head, LogitPost()
    expected = F.cross_entropy(head(rows), targets, reduction="none")
    for chunk in (1, 5, 23, 100):
        loss, hits = chunked_cross_entropy(projection, rows, targets, chunk)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
        assert torch.equal(hits, head(rows).argmax(-1) == targets)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(projection, rows, targets, 0)


POST_PROCESSED = {
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, tie_word_embeddings=True),
    "cohere": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, logit_scale=3.0),
    "granite": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, logits_scaling=0.25),
}


@pytest.mark.parametrize("model_type", sorted(POST_PROCESSED))
@pytest.mark.parametrize("reads", [False, True], ids=["fused", "per-token"])
def test_soft_capped_and_scaled_logits_are_reproduced(model_type, reads):
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **POST_PROCESSED[model_type])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    ids, mask, labels = batch("right")
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    expected_grads = gradients(model)
    model.zero_grad()
    TokenLossDispatcher.for_model(model).add(Weighted(weighted=False, reads=reads))
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    assert_same_gradients(gradients(model), expected_grads)


def test_post_processing_that_is_not_reproduced_is_refused():
    model = build("llama")
    model.config.logit_scale = 4.0  # the projection would scale; Llama's forward does not
    ids, mask, labels = batch()
    TokenLossDispatcher.for_model(model).add(PlainLoss())
    with pytest.raises(UnsupportedLogits, match="keep_logits=True"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_reading_outputs_logits_raises_and_keep_logits_restores_them():
    model = build("llama")
    ids, mask, labels = batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask)
    dispatcher = TokenLossDispatcher.for_model(model)
    lean = PlainLoss()
    dispatcher.add(lean)
    outputs = model(input_ids=ids, attention_mask=mask, labels=labels)
    with pytest.raises(LogitsNotKept, match="keep_logits=True"):
        outputs.logits
    with pytest.raises(KeyError):
        outputs["logits"]
    assert outputs[0] is outputs.loss  # the loss comes first, as when transformers computes it

    dispatcher.add(PlainLoss(keep_logits=True))
    outputs = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(outputs.logits, plain.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs.loss, naive_loss(model, ids, mask, labels, weighted=False), rtol=0, atol=1e-5)


def test_handlers_get_logits_of_the_positions_they_ask_for():
    model = build("qwen2")
    ids, mask, labels = batch("left")
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    seen = {}

    class AskLogits:
        def reshape_token_loss(self, ctx):
            with pytest.raises(LogitsNotKept):
                ctx.logits
            wanted = torch.zeros_like(ctx.attention_mask, dtype=torch.bool)
            wanted[:, -2:] = True
            seen["logits"] = ctx.logits_at(wanted)
            seen["wanted"] = wanted

    TokenLossDispatcher.for_model(model).add(AskLogits())
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen["logits"].shape == (2 * ids.shape[0], VOCAB)
    torch.testing.assert_close(seen["logits"], full[seen["wanted"]], rtol=0, atol=1e-5)


def test_evaluation_forwards_keep_transformers_loss_and_logits():
    model = build("llama")
    ids, mask, labels = batch()
    TokenLossDispatcher.for_model(model).add(PlainLoss())
    model.eval()
    with torch.no_grad():
        outputs = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert outputs.logits.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(outputs.loss, naive_loss(model, ids, mask, labels, weighted=False), rtol=0, atol=1e-6)


# -- LoRA, nf4 and the callbacks ------------------------------------------------------------------------------
def model_batch(model, side="right"):
    from lightning_tokens.modeling import causal_lm_of

    ids, mask, labels = batch(side)
    vocab = causal_lm_of(model).config.vocab_size
    ids, labels = ids % vocab, torch.where(labels == -100, labels, labels % vocab)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_selection_keeps_the_same_tokens_with_the_same_loss_and_gradients(kind, side):
    from lightning_tokens import TokenSelection

    results = []
    for keep_logits in (True, False):  # full logits, as before the lean loss, then the lean loss
        model = load(kind)
        data = model_batch(model, side)
        selection = TokenSelection(warmup=0, ratio=0.5, keep_logits=keep_logits)
        selection.attach(model)
        kept = Kept()
        selection.dispatcher.add(kept)
        loss = model(**data).loss
        loss.backward()
        results.append((loss.detach(), kept.kept, gradients(model), selection.metrics))
        selection.dispatcher.remove(kept)
        selection.detach()
    (full_loss, full_kept, full_grads, full_stats), (lean_loss, lean_kept, lean_grads, lean_stats) = results
    assert torch.equal(full_kept, lean_kept) and 0 < lean_kept.sum() < data["labels"].ne(-100).sum()
    torch.testing.assert_close(lean_loss, full_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(lean_stats["loss_history"], full_stats["loss_history"], rtol=0, atol=1e-5)
    assert_same_gradients(lean_grads, full_grads)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("architecture", ["layer", "resblock"])
def test_caft_loss_and_gradients_equal_an_independent_computation(kind, architecture):
    model, holder, caft = caft_on(kind, architecture)
    data = model_batch(model)
    loss = model(**data).loss
    loss.backward()
    lean_grads = gradients(holder)
    caft.teardown(None, holder, "fit")
    holder.zero_grad()
    expected = naive_caft_loss(model, holder.caft_heads, data, 0.5, 0.8, caft.schedule_weight)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    assert any(name.startswith("caft_heads.") for name in lean_grads)
    assert_same_gradients(lean_grads, gradients(holder))


# -- CausalLMModule ---------------------------------------------------------------------------------------
def test_causal_lm_module_trains_without_full_logits_and_a_step_reading_them_fails_clearly(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_tokens import CausalLMModule
    from lightning_tokens.modeling import ModelSpec

    module = CausalLMModule(model=ModelSpec(config=tiny_config()), max_new_tokens=0)
    data = model_batch(module.model)
    head_rows = rows_through_head(module.model)
    expected = module.model.train()(**data).loss.detach()
    module.setup("fit")
    for step in range(2):  # the first lean forward also checks the projection on the last positions
        torch.testing.assert_close(module.training_step(data, step).detach(), expected, rtol=0, atol=1e-5)
    # the first lean forward projects the last two positions of each row (the loss-terms check), then none
    assert head_rows[-1] == 0 and max(head_rows[1:]) <= 2 * data["input_ids"].shape[0]
    module.teardown("fit")

    class ReadsLogits(CausalLMModule):
        def training_step(self, batch, batch_idx):
            outputs = self.model(**batch)
            return outputs.loss + 0 * outputs.logits.sum()

    def fit(module):
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader([data], batch_size=None))

    with pytest.raises(LogitsNotKept, match="CausalLMModule"):
        fit(ReadsLogits(model=ModelSpec(config=tiny_config()), max_new_tokens=0))
    fit(ReadsLogits(model=ModelSpec(config=tiny_config()), max_new_tokens=0, keep_logits=True))


def test_one_ignore_index_for_the_whole_package():
    import ast
    import importlib
    from pathlib import Path

    import lightning_tokens
    from lightning_tokens import lean_loss

    assert lean_loss.IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
    for name in ("data.encode", "data.packing", "thoughts.loss", "thoughts.positions"):  # names of 0.1
        assert importlib.import_module(f"lightning_tokens.{name}").IGNORE_INDEX == lean_loss.IGNORE_INDEX
    package = Path(lightning_tokens.__file__).parent
    definitions, literals = [], []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE_INDEX" for t in node.targets):
                definitions.append(f"{path.relative_to(package)}:{node.lineno}")
            if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                    and getattr(node.operand, "value", None) == 100):
                literals.append(f"{path.relative_to(package)}:{node.lineno}")
    # the one -100 of the package is the one definition, in lean_loss.py
    assert len(definitions) == 1 and definitions[0].startswith("lean_loss.py:") and literals == definitions
