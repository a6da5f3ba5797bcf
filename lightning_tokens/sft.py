"""CausalLMModule: plain supervised fine-tuning of any causal LM from :mod:`lightning_tokens.modeling`."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_tokens.checks import check_numbers
from lightning_tokens.data.packing import batch_is_packed, model_inputs, real_token_count
from lightning_tokens.lean_loss import IGNORE_INDEX
from lightning_tokens.modeling import (
    ModelSpec,
    base_reference,
    inference_kwargs,
    is_peft_model,
    is_quantized,
    load_causal_lm,
)
from lightning_tokens.optim import OptimizerConfig, ResumesExactly, configure, parameter_groups
from lightning_tokens.quantization import restore_4bit_quant_states
from lightning_tokens.reasoning import THINK_END, THINK_START, extract_answer, is_correct, thinking_length
from lightning_tokens.sharding import (
    ClipsMixedGradients,
    data_parallel_mesh,
    full_state_dict,
    is_sharded,
    shard_causal_lm,
    warn_if_fsdp1,
)
from lightning_tokens.token_loss import ATTACHED_MODULES_KEY, PlainLoss, TokenLossDispatcher, model_loss_terms


class CausalLMModule(ResumesExactly, ClipsMixedGradients, LightningModule):
    """Supervised fine-tuning of a causal LM (full, LoRA or QLoRA) on batches from :class:`SFTDataModule`.

    ``training_step`` calls the model with ``labels`` and returns ``outputs.loss``, so token-level callbacks
    (:class:`TokenSelection`, ...) reshape the loss through :mod:`lightning_tokens.token_loss`.

    Logged: ``train/loss``, ``train/ppl``, ``train/tokens_per_sec``, ``val/loss``, ``val/ppl`` and, when the
    validation batches carry reference answers, ``val/exact_match`` and ``val/thinking_length`` from
    batched greedy generation. A mixture-of-experts model run with ``output_router_logits`` (in its config:
    ``ModelSpec(config={..., "output_router_logits": True})`` or ``extra``) trains on the loss transformers
    computes, cross-entropy plus ``router_aux_loss_coef * aux_loss``, and that term is logged as
    ``train/router_loss``; ``val/loss`` and ``val/ppl`` stay the next-token cross-entropy alone.

    Args:
        model: What model to load. Default ``ModelSpec()``: a tiny Llama with the embedded tokenizer.
        optimizer: Optimizer and schedule. Default ``OptimizerConfig()`` (AdamW 3e-4, 3% warm-up, cosine).
        max_new_tokens: Generation length for generation-based validation. Default ``256``.
        generation_batches: Validation batches scored by generation per validation run. Default ``None``:
            all of them; ``0`` turns generation off.
        keep_logits: Build the full ``(B, T, V)`` logits in training forwards (for a subclass whose
            ``training_step`` reads ``outputs.logits``). Default ``False``: the training loss is computed from
            the final hidden state in chunks of target positions (:mod:`lightning_tokens.lean_loss`), which at
            a 150k vocabulary takes a third of the memory; reading ``outputs.logits`` then raises.
    """

    def __init__(
        self,
        model: Optional[ModelSpec] = None,
        optimizer: Optional[OptimizerConfig] = None,
        max_new_tokens: int = 256,
        generation_batches: Optional[int] = None,
        keep_logits: bool = False,
    ) -> None:
        super().__init__()
        check_numbers("CausalLMModule", max_new_tokens=(max_new_tokens, "an integer >= 0"),
                      generation_batches=(generation_batches, "an integer >= 0 or None"))
        self.spec = model if model is not None else ModelSpec()
        self.optim = optimizer if optimizer is not None else OptimizerConfig()
        self.max_new_tokens = max_new_tokens
        self.generation_batches = generation_batches
        self.keep_logits = keep_logits
        self.save_hyperparameters()
        self.model, self.tokenizer = load_causal_lm(self.spec)
        self.val_loss = MeanMetric()
        # Perplexity is exp of the target-weighted mean loss: no second pass over the (B, T, V) logits.
        self.val_nll = MeanMetric()
        self.val_exact_match = MeanMetric()
        self.val_thinking_length = MeanMetric()
        self._step_started: Optional[float] = None

    # -- training --------------------------------------------------------------------------------------
    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @override
    def setup(self, stage: str) -> None:
        # Plain SFT goes through the loss dispatcher too (a handler that changes nothing), for the lean loss.
        if stage == "fit":
            self._plain_loss = PlainLoss(self.keep_logits)
            TokenLossDispatcher.for_model(self.model).add(self._plain_loss)

    @override
    def teardown(self, stage: str) -> None:
        plain = getattr(self, "_plain_loss", None)
        if stage == "fit" and plain is not None:
            TokenLossDispatcher.for_model(self.model).remove(plain)
            self._plain_loss = None

    @override
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._step_started = time.perf_counter()
        if getattr(self, "_plain_loss", None) is not None:
            TokenLossDispatcher.for_model(self.model).expect_packed = batch_is_packed(batch)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Padded batches carry an attention mask, packed ones (SFTDataModule(packing=True)) position ids instead.
        outputs = self.model(**model_inputs(batch))
        loss = outputs.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=50)))
        router = model_loss_terms(self.model, outputs).get("router")
        if router is not None:
            self.log("train/router_loss", router.detach())
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        if getattr(self, "_plain_loss", None) is not None:
            TokenLossDispatcher.for_model(self.model).expect_packed = False
        if self._step_started is None:
            return
        elapsed = time.perf_counter() - self._step_started
        tokens = real_token_count(batch).item()
        self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), prog_bar=True)

    # -- validation, test and predict -----------------------------------------------------------------
    @override
    def on_validation_start(self) -> None:
        self._refuse_shortest_only()

    @override
    def on_test_start(self) -> None:
        self._refuse_shortest_only()

    def _refuse_shortest_only(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.generation_batches and getattr(datamodule, "eval_by_length", False):
            raise ValueError("CausalLMModule.generation_batches with SFTDataModule(eval_by_length=True) would score "
                             "only the shortest held-out samples; unset one of them")

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        """Loss, perplexity and (with reference answers) generation metrics, logged as ``<stage>/...``.

        Validation and test never run at once, so they share the metric objects.
        """
        # a packed batch of a loader of your own carries use_cache=False: a cache would hide its sample boundaries
        outputs = self.model(**model_inputs(batch))
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        # the next-token loss alone: without the router term a mixture-of-experts model adds to its own loss
        nll = outputs.loss - sum(model_loss_terms(self.model, outputs).values())
        self.val_loss.update(nll, weight=targets)
        self.val_nll.update(nll, weight=targets)
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        wanted = self.generation_batches is None or batch_idx < self.generation_batches
        if "answers" in batch and wanted and self.max_new_tokens > 0:
            self._score_generations(batch, stage)

    def _log_perplexity(self, stage: str) -> None:
        if self.val_nll.update_count:
            self.log(f"{stage}/ppl", torch.exp(self.val_nll.compute()))
            self.val_nll.reset()

    def _score_generations(self, batch: dict, stage: str) -> None:
        completions = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        start, end = self.tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
        for ids, answer in zip(completions, batch["answers"]):
            if answer is None:
                continue
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.val_exact_match.update(float(is_correct(text, answer)))
            if start is not None and start != self.tokenizer.unk_token_id and start in ids:
                self.val_thinking_length.update(thinking_length(ids, start, end))
        self.log(f"{stage}/exact_match", self.val_exact_match, prog_bar=True)
        if self.val_thinking_length.update_count:
            self.log(f"{stage}/thinking_length", self.val_thinking_length)

    @override
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        """Greedy completions of a batch's prompts (``SFTDataModule.predict_dataloader``), one dict per row:
        ``prompt``, ``completion`` (the generated text), ``answer`` (the final answer extracted from it, or
        ``None``) and, where the record has a reference answer, ``reference`` and ``correct``."""
        completions = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        rows = []
        for prompt, mask, ids, reference in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                                completions, batch["answers"]):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            row: dict[str, Any] = {"prompt": self.tokenizer.decode(prompt[mask.bool()], skip_special_tokens=True),
                                   "completion": text, "answer": extract_answer(text)}
            if reference is not None:
                row.update(reference=reference, correct=is_correct(text, reference))
            rows.append(row)
        return rows

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> list[list[int]]:
        """Greedy completions (new token ids, up to eos) of left-padded prompts.

        A mixture-of-experts model decodes without router logits, whatever its config says (the router loss is a
        training term; see :func:`~lightning_tokens.modeling.inference_kwargs`).

        Args:
            input_ids: ``(B, T)`` left-padded prompt ids.
            attention_mask: ``(B, T)`` its mask.
            **kwargs: Overrides of ``generate()`` arguments (``max_new_tokens`` defaults to the module's).
        """
        options = dict(max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                       pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                       **inference_kwargs(self.model))
        options.update(kwargs)
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        finally:
            self.model.train(was_training)
        completions = []
        for row in output[:, input_ids.shape[1]:].tolist():
            eos = self.tokenizer.eos_token_id
            completions.append(row[: row.index(eos)] if eos in row else row)
        return completions

    # -- optimisation ----------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, shard the model with FSDP2 (see :mod:`lightning_tokens.sharding`):
        each decoder layer, then the whole model, on the data-parallel mesh; the blocks of auxiliary heads a callback
        attached (``caft_heads``) become units of their own (separate unembeddings stay whole on every rank, and
        :class:`~lightning_tokens.ConceptAwareFineTuning` averages their gradients). Under any other strategy,
        nothing happens."""
        warn_if_fsdp1(self._trainer, type(self).__name__)
        mesh = data_parallel_mesh(self)
        if mesh is not None:
            heads = getattr(self, "caft_heads", None)
            # each head block is called on its own, so each is a unit of its own (its hooks gather and reduce it)
            blocks = () if heads is None else tuple(heads.blocks)
            shard_causal_lm(self.model, mesh, self.trainer.precision, blocks)

    @override
    def configure_optimizers(self) -> dict:
        groups = parameter_groups(self.named_parameters(), self.optim.weight_decay)
        return configure(self.optim, groups, self.total_training_steps())

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_4bit_quant_states(self, checkpoint.get("state_dict", {}))
        # Submodules a callback attached (CAFT's heads) are in the checkpoint. Loaded without that callback
        # (``load_from_checkpoint`` for inference or export) they are not wanted: drop them instead of failing
        # strict loading. With the callback they exist by now (its ``setup`` runs first) and are restored.
        state = checkpoint.get("state_dict", {})
        for name in checkpoint.get(ATTACHED_MODULES_KEY, ()):
            if not hasattr(self, name):
                for key in [k for k in state if k.startswith(name + ".")]:
                    del state[key]

    # -- export ----------------------------------------------------------------------------------------
    def export(self, path: str | Path, merge_lora: bool = False) -> Path:
        """Write the model and tokenizer with ``save_pretrained``: a directory plain transformers / PEFT load.

        A full or merged model loads with ``AutoModelForCausalLM.from_pretrained(path)``. Adapters load with
        ``peft.AutoPeftModelForCausalLM.from_pretrained(path)``: their config names the base as the spec
        does (its hub name, or its local directory as an absolute path). A base built from a config has no
        such name, so it is written too, as it was trained (quantized weights included), to ``path/base``,
        and the adapters name that directory's absolute path. After moving the export, load that base
        yourself: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new / "base"), new)``.

        A model sharded by FSDP2 is gathered first, so every rank must call this (``fit`` callbacks do); rank 0
        writes. A sharded LoRA model is written from an unsharded twin on rank 0's CPU holding the gathered weights.

        Args:
            path: Output directory.
            merge_lora: Merge LoRA adapters into the base weights and write a plain model; otherwise a
                LoRA model writes its adapters only. Default ``False``. A quantized base cannot be merged
                exactly: load the base unquantized, load the adapters, then merge.
        """
        path = Path(path)
        if is_sharded(self.model):
            return self._export_sharded(path, merge_lora)
        self._write(self.model, path, merge_lora)
        return path

    def _write(self, model: Any, path: Path, merge_lora: bool) -> None:
        if merge_lora and hasattr(model, "merge_and_unload"):
            if is_quantized(model):
                raise ValueError("export(merge_lora=True): the base weights are quantized; merging into 4/8-bit "
                                 "weights is lossy. Reload the base unquantized with the adapters and merge there.")
            model = copy.deepcopy(model).merge_and_unload()
        if is_peft_model(model):
            _save_adapters(model, self.tokenizer, base_reference(self.spec), path)
        else:
            model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _export_sharded(self, path: Path, merge_lora: bool) -> Path:
        """:meth:`export` of a model sharded by FSDP2: every rank gathers the full weights, rank 0 writes them."""
        import torch.distributed as dist

        state = full_state_dict(self.model)
        if dist.get_rank() == 0:
            if is_peft_model(self.model):
                with torch.random.fork_rng():  # building the twin draws adapter initialisations
                    twin, _ = load_causal_lm(self.spec)
                twin.load_state_dict(state)
                self._write(twin, path, merge_lora)
            else:  # a full model has nothing to merge, and writes its gathered weights directly
                self.model.save_pretrained(path, state_dict=state)
                self.tokenizer.save_pretrained(path)
        dist.barrier()
        return path


def _save_adapters(model: Any, tokenizer: Any, base: Optional[str], path: Path) -> None:
    """``model.save_pretrained(path)`` for a PEFT model, its configs naming ``base`` (written first if ``None``)."""
    if base is None:
        base_dir = path / "base"
        # unload() takes the adapters out of a copy, leaving the base exactly as it trained (no merge).
        copy.deepcopy(model).unload().save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        base = str(base_dir.resolve())
    configs = model.peft_config.values()
    previous = [config.base_model_name_or_path for config in configs]
    try:
        for config in configs:
            config.base_model_name_or_path = base
        model.save_pretrained(path)
    finally:
        for config, name in zip(configs, previous):
            config.base_model_name_or_path = name
