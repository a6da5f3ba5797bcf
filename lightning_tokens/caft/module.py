"""MultiTokenHeadsModule: stage 1 of CAFT, pre-training the auxiliary heads on a frozen model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_tokens.caft.heads import Architecture, MultiTokenHeads, capture_trunk
from lightning_tokens.caft.loss import head_losses, weighted_sum
from lightning_tokens.checks import check_numbers
from lightning_tokens.data.packing import batch_samples, check_packed_forward, model_inputs
from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.optim import OptimizerConfig, ResumesExactly, configure, parameter_groups
from lightning_tokens.sharding import (
    ClipsMixedGradients,
    average_gradients,
    data_parallel_mesh,
    full_state_dict,
    shard_modules,
    warn_if_fsdp1,
)


def stage1_optimizer() -> OptimizerConfig:
    """The reference stage-1 optimizer: 8-bit AdamW, lr 1e-4, 300 warm-up steps, cosine decay."""
    return OptimizerConfig(name="adamw8bit", lr=1e-4, warmup=300, schedule="cosine")


class MultiTokenHeadsModule(ResumesExactly, ClipsMixedGradients, LightningModule):
    """Train :class:`MultiTokenHeads` on a frozen causal LM with ``sum_k gamma^k CE_k`` (main head excluded).

    The base model, its final norm and ``lm_head`` stay frozen and in eval mode (bit-identical after
    training); only the heads train. Checkpoints hold the heads alone (the base is reloaded from ``model``); a
    run resumed from one, mid-epoch too, continues as the uninterrupted run
    (:class:`~lightning_tokens.optim.ResumesExactly`).
    The heads are written to ``heads_path`` at the end of ``fit`` and can be written any time with
    :meth:`save_heads`. Batches are those of :class:`~lightning_tokens.SFTDataModule` (``input_ids``,
    ``attention_mask``, ``labels``); for the paper's self-distilled data, write the base model's own answers
    with :func:`~lightning_tokens.caft.distill.self_distill` and train on that JSONL.

    Logged: ``train/loss``, ``val/loss`` (the weighted sum) and per head ``{train,val}/head{k}_loss`` and
    ``{train,val}/head{k}_acc`` (top-1 accuracy).

    Args:
        model: The base model. Default ``ModelSpec()``: a tiny Llama. Quantized bases need LoRA to load and are
            not supported here; use a bf16 base.
        num_heads: Number of heads K. Default ``4``.
        architecture: ``"layer"``, ``"resblock"`` or ``"mtp"`` (the model's own kind of MTP layers, fresh; a model
            whose checkpoint has trained ones needs no stage 1: see :meth:`MultiTokenHeads.from_model`). Default
            ``"layer"``.
        separate_unembedding: Own unembedding per head, initialised from ``lm_head``. Default ``False``.
        gamma: Decay of the head weights. Default ``0.8``.
        optimizer: Default :func:`stage1_optimizer` (8-bit AdamW, lr 1e-4, 300 warm-up steps, cosine).
        heads_path: Directory the heads are written to at the end of ``fit``. Default ``"runs/caft-heads/heads"``;
            ``None`` writes nothing.
        chunk_size: Target positions projected onto the vocabulary at once. Default ``1024``.
    """

    def __init__(
        self,
        model: Optional[ModelSpec] = None,
        num_heads: int = 4,
        architecture: Architecture = "layer",
        separate_unembedding: bool = False,
        gamma: float = 0.8,
        optimizer: Optional[OptimizerConfig] = None,
        heads_path: Optional[str] = "runs/caft-heads/heads",
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        check_numbers("MultiTokenHeadsModule", num_heads=(num_heads, "an integer >= 1"), gamma=(gamma, "in (0, 1]"),
                      chunk_size=(chunk_size, "an integer >= 1"))
        self.spec = model if model is not None else ModelSpec()
        if self.spec.quantization is not None:
            raise ValueError("MultiTokenHeadsModule.model.quantization: stage 1 needs an unquantized base")
        self.optim = optimizer if optimizer is not None else stage1_optimizer()
        self.gamma, self.heads_path, self.chunk_size = gamma, heads_path, chunk_size
        self.save_hyperparameters()
        self.model, self.tokenizer = load_causal_lm(self.spec)
        self.model.requires_grad_(False)
        self.model.eval()
        self.heads = MultiTokenHeads(self.model, num_heads, architecture, separate_unembedding)
        self.val_loss = MeanMetric()
        self.val_acc = torch.nn.ModuleList([MeanMetric() for _ in range(num_heads)])
        self.val_head_loss = torch.nn.ModuleList([MeanMetric() for _ in range(num_heads)])
        self.strict_loading = False  # checkpoints hold the heads only

    @override
    def train(self, mode: bool = True) -> "MultiTokenHeadsModule":
        super().train(mode)
        self.model.eval()  # the frozen base never uses dropout
        return self

    def _losses(self, batch: dict):
        base = causal_lm_of(self.model)
        check_packed_forward(base, batch["input_ids"], model_inputs(batch, labels=False))  # once per model
        with torch.no_grad(), capture_trunk(base, final=self.heads.variant.reads_final_hidden) as holder:
            base.base_model(**{**model_inputs(batch, labels=False), "use_cache": False})
        trunk = holder["trunk"].detach()
        # A packed batch (SFTDataModule(packing=True)) has no attention mask: its samples are told by position ids.
        real, segments = batch_samples(batch)
        return head_losses(self.heads, base, trunk, batch["labels"], real, self.chunk_size, segments)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        loss = weighted_sum(losses, self.gamma)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage-1 loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        for k, item in enumerate(losses, start=1):
            self.log(f"train/head{k}_loss", item.loss.detach())
            self.log(f"train/head{k}_acc", item.accuracy, prog_bar=k == 1)
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self._losses(batch)
        self.val_loss.update(weighted_sum(losses, self.gamma))
        self.log("val/loss", self.val_loss, prog_bar=True)
        for k, item in enumerate(losses, start=1):
            if item.count > 0:
                self.val_acc[k - 1].update(item.accuracy, weight=item.count)
                self.val_head_loss[k - 1].update(item.loss, weight=item.count)
            self.log(f"val/head{k}_acc", self.val_acc[k - 1], prog_bar=k == 1)
            self.log(f"val/head{k}_loss", self.val_head_loss[k - 1])

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2), shard each head block as a unit of its own; the frozen base
        stays whole on every rank. Separate unembeddings (read as weights by the chunked loss, outside any module
        call FSDP2 could gather around) stay whole on every rank too, their gradients averaged after each backward."""
        warn_if_fsdp1(self._trainer, type(self).__name__)
        mesh = data_parallel_mesh(self)
        if mesh is not None:
            shard_modules(tuple(self.heads.blocks), mesh, self.trainer.precision)

    @override
    def on_after_backward(self) -> None:
        mesh = data_parallel_mesh(self)
        if mesh is not None and self.heads.unembeddings is not None:
            average_gradients(self.heads.unembeddings.parameters(), mesh)

    @override
    def configure_optimizers(self) -> dict:
        groups = parameter_groups(self.heads.named_parameters(), self.optim.weight_decay)
        return configure(self.optim, groups, self.total_training_steps())

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}

    @override
    def on_fit_end(self) -> None:
        if self.heads_path is not None:
            self.save_heads(self.heads_path)

    def save_heads(self, path: str | Path) -> Path:
        """Write the heads (``heads.safetensors`` + ``heads_config.json``) to directory ``path``, from rank 0.

        Sharded heads are gathered first, so under ``ModelParallelStrategy`` every rank calls this (``fit`` does).
        """
        state = full_state_dict(self.heads)
        if self._trainer is None or self._trainer.is_global_zero:
            self.heads.save(path, state)
        return Path(path)
