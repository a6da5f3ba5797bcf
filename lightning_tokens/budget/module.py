"""BudgetPredictorModule: train the remaining-length predictor on a frozen causal LM's hidden states."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_tokens.budget.capture import HiddenStateCapture
from lightning_tokens.budget.gamma import decoded_mode, encode_length, gamma_cdf, gamma_nll
from lightning_tokens.budget.predictor import BudgetPredictor
from lightning_tokens.checks import check_numbers
from lightning_tokens.data.packing import FLASH_KEYS, batch_samples
from lightning_tokens.modeling import ModelSpec, decoder_of, load_frozen_causal_lm
from lightning_tokens.optim import OptimizerConfig, ResumesExactly, configure, parameter_groups
from lightning_tokens.sharding import data_parallel_mesh, full_state_dict, shard_modules, warn_if_fsdp1


class BudgetPredictorModule(ResumesExactly, LightningModule):
    """Train a :class:`BudgetPredictor` on a frozen LM: Gamma NLL of ``y = log(L + 1)`` at the realised next token.

    The LM runs under ``no_grad`` in eval mode (it may be 4/8-bit quantized) and is left out of checkpoints;
    its hidden states are read with hooks from the decoder stack alone (no LM head, no logits). Batches come
    from :class:`TraceDataModule` (``input_ids``, ``attention_mask``, ``remaining``). A run resumed from a
    checkpoint, mid-epoch too, continues as the uninterrupted run (:class:`~lightning_tokens.optim.ResumesExactly`).

    Logged: ``train/loss``, ``val/loss`` (Gamma NLL per supervised position), ``val/abs_error`` (absolute
    error in tokens of the decoded length ``exp(mode) - 1``), ``val/within_window`` (share of positions with
    that error at most ``window``) and ``val/window_prob`` (the reference's metric: predicted probability that
    the true length is in ``[L, L + window]``).

    Args:
        model: The frozen LM. Default ``ModelSpec()`` (a tiny Llama).
        predictor: :class:`PredictorConfig` fields other than the sizes read from the LM (``body``,
            ``d_model``, ...). Default ``None``: the default small transformer body.
        optimizer: Default ``OptimizerConfig(lr=1e-4, warmup=0.05, schedule="constant")``, the paper's.
        window: Tokens of the metric window. Default ``10`` (the reference's interval).
        predictor_path: Where :meth:`on_train_end` also writes the predictor alone. Default ``None``.
    """

    def __init__(self, model: Optional[ModelSpec] = None, predictor: Optional[dict[str, Any]] = None,
                 optimizer: Optional[OptimizerConfig] = None, window: int = 10,
                 predictor_path: Optional[str] = None) -> None:
        super().__init__()
        check_numbers("BudgetPredictorModule", window=(window, "an integer >= 0"))
        self.save_hyperparameters()
        self.spec = model if model is not None else ModelSpec()
        self.optim = optimizer if optimizer is not None else OptimizerConfig(lr=1e-4, warmup=0.05, schedule="constant")
        self.window, self.predictor_path = window, predictor_path
        self.model, self.tokenizer = load_frozen_causal_lm(self.spec)
        self.predictor = BudgetPredictor.for_model(self.model, **(predictor or {}))
        self.strict_loading = False  # checkpoints hold the predictor only
        self.val_loss, self.val_abs_error = MeanMetric(), MeanMetric()
        self.val_within, self.val_window_prob = MeanMetric(), MeanMetric()

    @override
    def train(self, mode: bool = True) -> "BudgetPredictorModule":
        super().train(mode)
        self.model.eval()  # the LM stays in eval mode (no dropout) while the predictor trains
        return self

    # -- core ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], select: torch.Tensor,
                      position_ids: Optional[torch.Tensor] = None, **flash: Any) -> torch.Tensor:
        """``(P, N + 1, H)`` hidden states of the frozen LM at the ``select`` positions (``position_ids``, no
        ``attention_mask`` and, under flash attention, the ``cu_seq_lens_*`` of a packed batch)."""
        with HiddenStateCapture(self.model, last_only=False, mask=select) as capture:
            decoder_of(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False, **flash)
            return capture.states

    def step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per supervised position: NLL, shape, rate and true ``L`` (realised next tokens as candidates)."""
        remaining = batch["remaining"]
        real, segments = batch_samples(batch)
        select = (remaining > 0) & real
        if segments is not None:  # several traces per row: a position's next token must be of its own trace
            select[:, :-1] &= segments[:, 1:] == segments[:, :-1]
        select[:, -1] = False  # the last position has no next token in the batch
        flash = {key: batch[key] for key in FLASH_KEYS if key in batch}
        states = self.hidden_states(batch["input_ids"], batch.get("attention_mask"), select, batch.get("position_ids"),
                                    **flash)
        next_tokens = batch["input_ids"][:, 1:][select[:, :-1]]
        length = remaining[select].float()
        alpha, rate = self.predictor(states, next_tokens)
        return gamma_nll(alpha, rate, encode_length(length)), alpha, rate, length

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll = self.step(batch)[0]
        # A batch without a supervised position still joins the graph (DDP needs every rank to backward).
        loss = nll.mean() if nll.numel() else sum(p.sum() for p in self.predictor.parameters()) * 0.0
        if not torch.isfinite(loss):
            raise FloatingPointError(f"budget predictor loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=max(1, nll.numel()))
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        nll, alpha, rate, length = self.step(batch)
        if not nll.numel():
            return
        error = (decoded_mode(alpha, rate) - length).abs()
        window_prob = (gamma_cdf(alpha, rate, encode_length(length + self.window))
                       - gamma_cdf(alpha, rate, encode_length(length)))
        self.val_loss.update(nll)
        self.val_abs_error.update(error)
        self.val_within.update((error <= self.window).float())
        self.val_window_prob.update(window_prob)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/abs_error", self.val_abs_error, prog_bar=True)
        self.log("val/within_window", self.val_within)
        self.log("val/window_prob", self.val_window_prob)

    # -- optimisation and checkpoints -----------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2), shard the predictor; the frozen LM stays whole on every rank."""
        warn_if_fsdp1(self._trainer, type(self).__name__)
        mesh = data_parallel_mesh(self)
        if mesh is not None:
            shard_modules((self.predictor,), mesh, self.trainer.precision)

    @override
    def configure_optimizers(self) -> dict:
        groups = parameter_groups(self.predictor.named_parameters(), self.optim.weight_decay)
        return configure(self.optim, groups, self.total_training_steps())

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}

    @override
    def on_train_end(self) -> None:
        if self.predictor_path:
            state = full_state_dict(self.predictor)  # every rank takes part when the predictor is sharded
            if self.trainer.is_global_zero:
                self.predictor.save(self.predictor_path, state)
