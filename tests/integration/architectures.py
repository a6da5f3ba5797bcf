"""The architecture sweep: every method of the package on a tiny model of each transformers model type.

Each cell (a model type x a method) runs the method through the package's public API on a 2-layer, 32-wide model
built with :class:`~lightning_tokens.ModelSpec` and checks it against an independent computation (transformers'
own loss and ``generate``, each sample run alone, CE from full logits by hand). A cell ends in one of three ways:

- ``"yes"``: the method runs and matches;
- ``"refused: <error class>: <first line>"``: the package refused the model with a clear error of its own (a
  ``ValueError``, ``RuntimeError``, ``NotImplementedError`` or ``TypeError`` from a ``raise`` statement in
  ``lightning_tokens``);
- a failure: any other exception (from transformers or torch, say) or a numeric mismatch, raised as is.

``tests/integration/test_architectures.py`` runs every cell as its own test and checks the support table in
docs/model-types.md against this run's outcomes. The table is regenerated with::

    .venv/bin/python -m tests.integration.architectures                 # print the table (the whole sweep, ~30 s)
    .venv/bin/python -m tests.integration.architectures --write-docs    # and write it between the page's markers
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import lightning_tokens
from lightning_tokens import (
    BudgetGuidanceLogitsProcessor,
    BudgetPredictorModule,
    ModelSpec,
    MultiTokenHeadsModule,
    PackedCollator,
    PlainLoss,
    QuietSTaRModule,
    ReasoningTask,
    TokenLossCallback,
    TokenLossDispatcher,
    TokenSelection,
    generate_with_heads,
    load_causal_lm,
)
from lightning_tokens.budget.data import collate_traces, encode_traces
from lightning_tokens.data.encode import Encoded
from lightning_tokens.data.records import from_dicts

PAGE = Path(__file__).resolve().parents[2] / "docs" / "model-types.md"
START, END = "<!-- architectures:start -->", "<!-- architectures:end -->"
VERSION_LINE = "Generated with transformers {version} by `python -m tests.integration.architectures --write-docs`."
IGNORE = -100

_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_MOE = dict(num_experts_per_tok=2, output_router_logits=True)
_MLA_MOE = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                first_k_dense_replace=1)

#: Tiny sizes of each case: hidden 32, 2 layers, 4 heads (head_dim 8), MoE with 4 experts of which 2 per token.
#: A case is named by its model type, or ``"<type> (<setting>)"`` for a variant worth its own row.
CASES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_LLAMA),
    "mistral": dict(model_type="mistral", **_LLAMA),
    "mixtral": dict(model_type="mixtral", **_LLAMA, num_local_experts=4, **_MOE),
    "qwen2": dict(model_type="qwen2", **_LLAMA),
    "qwen2_moe": dict(model_type="qwen2_moe", **_LLAMA, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                      num_experts=4, **_MOE),
    "qwen3": dict(model_type="qwen3", **_LLAMA, head_dim=8),
    "qwen3_moe": dict(model_type="qwen3_moe", **_LLAMA, head_dim=8, moe_intermediate_size=16, num_experts=4, **_MOE),
    "gemma": dict(model_type="gemma", **_LLAMA, head_dim=8),
    # sliding windows shorter than the test rows, so that they matter; gemma2's soft cap at the scale of a tiny
    # model's logits (a real model's reach its default cap of 30), so that dropping it shows
    "gemma2": dict(model_type="gemma2", **_LLAMA, head_dim=8, sliding_window=6, query_pre_attn_scalar=8,
                   final_logit_softcapping=2.0),
    "gemma3_text": dict(model_type="gemma3_text", **_LLAMA, head_dim=8, sliding_window=6, query_pre_attn_scalar=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(model_type="phi", **_LLAMA),
    "phi3": dict(model_type="phi3", **_LLAMA),
    "olmo2": dict(model_type="olmo2", **_LLAMA),
    "granite": dict(model_type="granite", **_LLAMA, logits_scaling=8.0),  # logits divided by 8, as granite-3's
    "cohere": dict(model_type="cohere", **_LLAMA),
    "starcoder2": dict(model_type="starcoder2", **_LLAMA),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4),
    "falcon": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "falcon (alibi)": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True),
    "stablelm": dict(model_type="stablelm", **_LLAMA),
    # multi-head latent attention: value heads (8) narrower than query/key heads (8 + 8)
    "deepseek_v3": dict(model_type="deepseek_v3", **_MLA_MOE, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "glm4": dict(model_type="glm4", **_LLAMA, head_dim=8),
    "glm4_moe": dict(model_type="glm4_moe", **_MLA_MOE, num_key_value_heads=2, head_dim=8),
    "smollm3": dict(model_type="smollm3", **_LLAMA),
    "cohere2": dict(model_type="cohere2", **_LLAMA, sliding_window=6),
    "olmo": dict(model_type="olmo", **_LLAMA),
    "granitemoe": dict(model_type="granitemoe", **_LLAMA, num_local_experts=4, **_MOE),
    "olmoe": dict(model_type="olmoe", **_LLAMA, num_experts=4, **_MOE),
    "phimoe": dict(model_type="phimoe", **_LLAMA, num_local_experts=4, **_MOE),
    "exaone4": dict(model_type="exaone4", **_LLAMA, head_dim=8),
    "seed_oss": dict(model_type="seed_oss", **_LLAMA, head_dim=8),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32),
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=32, n_layer=2, n_head=4),
    "gptj": dict(model_type="gptj", n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    "bloom": dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4),
    "mpt": dict(model_type="mpt", d_model=32, n_layers=2, n_heads=4),
}

#: Method keys (test ids) and their column titles in the support table.
METHODS: dict[str, str] = {
    "lean_loss": "lean loss",
    "sstoken": "ssToken",
    "caft_heads": "CAFT heads",
    "quiet_star": "Quiet-STaR",
    "budget": "budget guidance",
    "packing": "packing",
}
#: Exceptions the package raises on purpose to refuse what it does not support.
REFUSALS = (ValueError, RuntimeError, NotImplementedError, TypeError)
PACKAGE_DIR = Path(lightning_tokens.__file__).resolve().parent


def missing(case: str) -> Optional[str]:
    """Why ``case`` cannot run with the installed transformers (its model type is unknown), else ``None``."""
    model_type = CASES[case]["model_type"]
    if model_type in CONFIG_MAPPING:
        return None
    return f"transformers {transformers.__version__} has no model type {model_type!r}"


def spec_of(case: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``case``: its tiny sizes, every dropout and training noise (router jitter) of the
    model type at 0, so that two training forwards of a batch compute the same."""
    sizes = CASES[case]
    defaults = AutoConfig.for_model(sizes["model_type"]).to_dict()
    noisy = [name for name, value in defaults.items()
             if any(word in name for word in ("dropout", "pdrop", "jitter")) and isinstance(value, float) and value]
    return ModelSpec(config={**dict.fromkeys(noisy, 0.0), **sizes})


# -- batches -------------------------------------------------------------------------------------------------
ROWS = (11, 7, 9)  # tokens per sample
PROMPT = 3  # the first tokens of each sample are its prompt (no targets)


def sample_rows(seed: int = 3, lengths: tuple[int, ...] = ROWS) -> list[list[int]]:
    """Rows of random ordinary token ids of the task tokenizer (not its special or think tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=generator).tolist() for n in lengths]


def padded_batch(side: str, prompt: int = PROMPT) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompts and padding), padded on ``side``."""
    rows = sample_rows()
    width = max(map(len, rows)) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, row in enumerate(rows):
        start = 0 if side == "right" else width - len(row)
        ids[i, start:start + len(row)] = torch.tensor(row)
        mask[i, start:start + len(row)] = 1
        labels[i, start + prompt:start + len(row)] = torch.tensor(row[prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_padded_prompts(lengths: tuple[int, ...] = (6, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts, bos first."""
    rows = [[1, *row] for row in sample_rows(seed=5, lengths=lengths)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


# -- independent computations -----------------------------------------------------------------------------------
def generation_options(model: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments ``generate`` needs on ``model``: without router logits, with which transformers' MoE models
    fail on a padded batch (their load-balancing loss reads the prompt's mask at every decoding step)."""
    config = model.config if hasattr(model, "config") else None
    return {"output_router_logits": False} if getattr(config, "output_router_logits", False) else {}


def full_logits(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """Float32 ``(B, T, V)`` logits of a forward without labels (the dispatcher lets it pass untouched)."""
    with torch.no_grad():
        return model(**inputs).logits.float()


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, T - 1)`` cross-entropy of each next-token prediction, 0 where the label is ``-100``."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def loss_and_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = gradients(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# -- the cells --------------------------------------------------------------------------------------------------
def lean_loss(spec: ModelSpec, model: torch.nn.Module) -> None:
    """The dispatcher's loss (:class:`PlainLoss`) and gradients equal transformers' own, right and left padded."""
    model.train()
    for side in ("right", "left"):
        batch = padded_batch(side)
        expected, expected_grads = loss_and_gradients(model, batch)
        dispatcher, handler = TokenLossDispatcher.for_model(model), PlainLoss()
        dispatcher.add(handler)
        try:
            loss, grads = loss_and_gradients(model, batch)
        finally:
            dispatcher.remove(handler)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5, msg=lambda m: f"{side}-padded loss: {m}")
        assert grads.keys() == expected_grads.keys(), f"{side}-padded: other parameters got gradients"
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{side}-padded gradient of {name}: {m}")


class _UserModule(pl.LightningModule):
    """A user's module: calls the causal LM with labels, returns ``outputs.loss`` (lr 0: the weights stay)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.net(**batch).loss
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Weights(TokenLossCallback):
    """Records the token weights the handlers before it left (attached after the callback under test)."""

    weights: Optional[torch.Tensor] = None

    def reshape_token_loss(self, ctx) -> None:
        self.weights = ctx.weights.detach().clone()


def _fit_one_step(module: pl.LightningModule, batch: dict, callbacks: list) -> None:
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks)
        trainer.fit(module, DataLoader([batch], batch_size=None))


def sstoken(spec: ModelSpec, model: torch.nn.Module, ratio: float = 0.5) -> None:
    """One training step with :class:`TokenSelection` (REL and attention mixed): each sample keeps
    ``ceil(ratio * n)`` of its ``n`` targets, and the loss is the mean CE over the kept ones (plus the loss terms
    transformers adds to its own CE, e.g. a MoE router's auxiliary loss)."""
    batch = padded_batch("right")
    module, selection, weights = _UserModule(model), TokenSelection(ratio=ratio, gamma=0.5, warmup=0), _Weights()
    try:
        _fit_one_step(module, batch, [selection, weights])
    finally:  # a fit that raised skips the callbacks' teardown: they would stay on the model
        selection.detach()
        weights.teardown(None, module, "fit")
    assert weights.weights is not None, "TokenSelection ran no training forward"
    kept = weights.weights > 0
    targets = (batch["labels"][:, 1:] != IGNORE).sum(-1)
    expected_kept = [math.ceil(ratio * int(n)) for n in targets]
    assert kept.sum(-1).tolist() == expected_kept, f"kept {kept.sum(-1).tolist()} of {targets.tolist()} targets"
    model.eval()
    try:
        logits = full_logits(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            own = model(**batch).loss  # transformers' loss: its CE over every target, and any extra terms
    finally:
        model.train()
    ce = token_ce(logits, batch["labels"])
    extra = own - ce.sum() / targets.sum()
    expected = ce[kept].mean() + extra
    torch.testing.assert_close(module.losses[0], expected, rtol=1e-5, atol=1e-5)


def caft_heads(spec: ModelSpec, model: torch.nn.Module) -> None:
    """Stage 1 (:class:`MultiTokenHeadsModule`) trains the heads alone; ``generate_with_heads`` equals greedy
    ``generate`` on a left-padded batch."""
    module = MultiTokenHeadsModule(spec, num_heads=2, heads_path=None).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step(padded_batch("right"), 0)
    assert torch.isfinite(loss), f"stage-1 loss {loss.item()}"
    loss.backward()
    head_grads = [p.grad for p in module.heads.parameters() if p.requires_grad]
    assert head_grads and all(g is not None and torch.isfinite(g).all() for g in head_grads), "heads got no gradient"
    assert all(p.grad is None for p in module.model.parameters()), "the frozen model got gradients"

    module.eval()
    with torch.no_grad():  # imperfect drafts: some accepted, some rejected
        for p in module.heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids, mask = left_padded_prompts()
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    expected = module.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                     eos_token_id=eos, pad_token_id=pad, **generation_options(module.model))
    got, _ = generate_with_heads(module.model, module.heads, ids, mask, max_new_tokens=8, eos_token_id=eos,
                                 pad_token_id=pad)
    assert got.tolist() == expected.tolist(), f"generate_with_heads {got.tolist()} != generate {expected.tolist()}"


def quiet_star(spec: ModelSpec, model: torch.nn.Module) -> None:
    """One :class:`QuietSTaRModule` training step gives a finite loss whose thought-free part (the base NLL) is the
    model's own next-token CE; thoughtful generation runs on a left-padded batch."""
    module = QuietSTaRModule(spec, n_thoughts=2, thought_length=2, n_ahead_talk=2, max_new_tokens=3).train()
    batch = padded_batch("right")
    out = module.quiet_star(batch["input_ids"], batch["attention_mask"])
    assert torch.isfinite(out.loss), f"Quiet-STaR loss {out.loss.item()}"
    out.loss.backward()
    assert module.mixing_head.net[-1].weight.grad is not None, "the mixing head got no gradient"

    module.eval()
    logits = full_logits(module.lm, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits[..., module.forbidden_ids] = float("-inf")  # delimiters are never predicted
    text = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    ce = token_ce(logits, text)
    expected = ce.sum() / (text[:, 1:] != IGNORE).sum()
    torch.testing.assert_close(out.base_nll, expected, rtol=1e-4, atol=1e-5)

    ids, mask = left_padded_prompts()
    generated = module.generate(ids, mask, max_new_tokens=3, eos_token_id=None)
    assert generated.sequences.shape == (ids.shape[0], ids.shape[1] + 3)
    assert not torch.isin(generated.sequences[:, ids.shape[1]:], module.forbidden_ids).any()


def budget(spec: ModelSpec, model: torch.nn.Module) -> None:
    """One :class:`BudgetPredictorModule` step: its Gamma NLL equals one from ``output_hidden_states`` and
    ``torch.distributions``; guided ``generate`` with :class:`BudgetGuidanceLogitsProcessor` runs and guides."""
    module = BudgetPredictorModule(spec).train()
    tokenizer = module.tokenizer
    records = from_dicts(ReasoningTask(num_train=3, num_val=1).records("train"), "task")
    batch = collate_traces(encode_traces(records, tokenizer, max_length=32)[0], tokenizer.pad_token_id)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss), f"budget predictor loss {loss.item()}"
    loss.backward()
    assert all(p.grad is not None for p in module.predictor.parameters() if p.requires_grad)

    nll = module.step(batch)[0].detach()
    with torch.no_grad():
        states = torch.stack(module.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                          output_hidden_states=True).hidden_states, dim=2)
    select = (batch["remaining"] > 0) & batch["attention_mask"].bool()
    select[:, -1] = False
    with torch.no_grad():
        alpha, rate = module.predictor(states[select], batch["input_ids"][:, 1:][select[:, :-1]])
    lengths = batch["remaining"][select].float()
    expected = -torch.distributions.Gamma(alpha, rate).log_prob(torch.log(lengths + 1))
    torch.testing.assert_close(nll, expected, rtol=1e-4, atol=1e-5)

    tokenizer.padding_side = "left"
    prompts = tokenizer(["Compute 1 + 2.<think>\n", "Compute 12 + 30 - 4.<think>\n1"], return_tensors="pt",
                        padding=True)
    module.eval()
    with BudgetGuidanceLogitsProcessor(module.model, module.predictor, tokenizer, [4, 30], steps="every",
                                       min_rate=0.0, min_shape=0.0, min_mode=-1.0) as guide:
        out = module.model.generate(**prompts, logits_processor=[guide], max_new_tokens=6, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                                    **generation_options(module.model))
        assert guide.guided_row_steps > 0, "guidance guided no step"
    assert out.shape == (2, prompts["input_ids"].shape[1] + 6)


def packing(spec: ModelSpec, model: torch.nn.Module) -> None:
    """A packed training forward through the dispatcher gives every sample the logits it has alone."""
    model.train()
    rows = sample_rows(seed=7, lengths=(7, 5, 9, 4))
    samples = [Encoded(row, [IGNORE] * 2 + row[2:], 2, f"sample {i}") for i, row in enumerate(rows)]
    packed = PackedCollator(pad_token_id=0)([samples[:2], samples[2:]])
    packed.pop("use_cache")  # the dispatcher must turn the cache off itself
    dispatcher, handler = TokenLossDispatcher.for_model(model), PlainLoss(keep_logits=True)
    dispatcher.add(handler)
    try:
        with torch.no_grad():
            logits = model(**packed).logits.float()
    finally:
        dispatcher.remove(handler)
    for r, pair in enumerate((samples[:2], samples[2:])):
        start = 0
        for item in pair:
            n = len(item.input_ids)
            alone = full_logits(model, input_ids=torch.tensor([item.input_ids]))[0]
            torch.testing.assert_close(logits[r, start:start + n], alone, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{item.origin} packed vs alone: {m}")
            start += n


CELLS: dict[str, Callable[[ModelSpec, torch.nn.Module], None]] = {
    "lean_loss": lean_loss, "sstoken": sstoken, "caft_heads": caft_heads, "quiet_star": quiet_star,
    "budget": budget, "packing": packing,
}


# -- outcomes ---------------------------------------------------------------------------------------------------
def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is a clear refusal: a :data:`REFUSALS` exception that a ``raise`` statement of the
    ``lightning_tokens`` package raised (not one that torch or transformers raised, in package code or not)."""
    if not isinstance(error, REFUSALS):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    return Path(last.filename).resolve().is_relative_to(PACKAGE_DIR) and (last.line or "").startswith("raise")


def describe(error: BaseException) -> str:
    """``"<error class>: <first line of its message>"``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def build(case: str) -> tuple[ModelSpec, torch.nn.Module]:
    """``(spec, model)`` of ``case``, the model built once and shared by the cells that need no module of their own."""
    spec = spec_of(case)
    model, _ = load_causal_lm(spec)
    return spec, model


def run_cell(method: str, spec: ModelSpec, model: torch.nn.Module) -> str:
    """``"yes"`` or ``"refused: <error class>: <first line>"``; a failure (an unexpected exception, a mismatch)
    propagates."""
    torch.manual_seed(0)
    try:
        CELLS[method](spec, model)
    except REFUSALS as error:
        if not is_refusal(error):
            raise
        return f"refused: {describe(error)}"
    return "yes"


def sweep(cases: Optional[list[str]] = None, methods: Optional[list[str]] = None) -> dict[tuple[str, str], str]:
    """Run the cells outside pytest: ``{(case, method): outcome}``, failures as ``"FAIL: <error>"``."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    results = {}
    for case in cases or list(CASES):
        reason = missing(case)
        if reason is not None:
            print(f"skipped {case}: {reason}")
            continue
        try:
            spec, model = build(case)
        except Exception as error:  # the model does not even build
            failure = f"FAIL: {describe(error)}"
            results.update({(case, m): failure for m in methods or METHODS})
            print(f"{case:16s} (build)           {failure}", flush=True)
            continue
        for method in methods or list(METHODS):
            start = time.perf_counter()
            try:
                results[case, method] = run_cell(method, spec, model)
            except Exception as error:
                results[case, method] = f"FAIL: {describe(error)}"
            print(f"{case:16s} {method:11s} {time.perf_counter() - start:5.2f}s {results[case, method]}", flush=True)
    return results


# -- the support table ------------------------------------------------------------------------------------------
def support_table(results: dict[tuple[str, str], str]) -> str:
    """The Markdown table of ``results``: ``yes``, or ``no`` with a numbered note giving the refusal."""
    cases = [case for case in CASES if any((case, m) in results for m in METHODS)]
    notes: list[str] = []
    lines = ["| model type | " + " | ".join(METHODS.values()) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for case in cases:
        cells = []
        for method in METHODS:
            outcome = results.get((case, method), "not run")
            if outcome.startswith("refused: "):
                note = outcome[len("refused: "):]
                if note not in notes:
                    notes.append(note)
                outcome = f"no ({notes.index(note) + 1})"
            cells.append(outcome)
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"{i}. {_escape(note)}" for i, note in enumerate(notes, start=1))
    lines.extend(["", VERSION_LINE.format(version=transformers.__version__)])
    return "\n".join(lines) + "\n"


def table_version(section: str) -> Optional[str]:
    """The transformers version a support table was generated with, or ``None`` if it does not say."""
    before, after = VERSION_LINE.split("{version}")
    match = re.search(re.escape(before) + r"(\S+)" + re.escape(after), section)
    return None if match is None else match.group(1)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_section(page: str) -> Optional[str]:
    """The text between the page markers, or ``None`` without them."""
    match = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), page, flags=re.S)
    return None if match is None else match.group(1)


def write_page(table: str, path: Path = PAGE) -> None:
    text = path.read_text()
    if table_section(text) is None:
        raise SystemExit(f"{path} has no {START} ... {END} markers to write the table between")
    start, end = text.index(START) + len(START), text.index(END)
    path.write_text(text[:start] + "\n" + table + text[end:])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.architectures",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", "--write-readme", dest="write_docs", action="store_true",
                        help=f"write the table between the markers of {PAGE.name}")
    parser.add_argument("--case", action="append", choices=list(CASES), metavar="CASE",
                        help=f"only this case (repeatable): {', '.join(CASES)}")
    parser.add_argument("--method", action="append", choices=list(METHODS), metavar="METHOD",
                        help=f"only this method (repeatable): {', '.join(METHODS)}")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = sweep(args.case, args.method)
    print()
    print(support_table(results))
    failures = {cell: outcome for cell, outcome in results.items() if outcome.startswith("FAIL")}
    if args.write_docs:
        if failures or args.case or args.method:
            print("Page not written: the table needs the whole sweep without failures")
            return 1
        write_page(support_table(results))
        print(f"wrote the table into {PAGE}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
