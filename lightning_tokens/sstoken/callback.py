"""TokenSelection: ssToken (and Rho-1, loss-only, attention-only, random) token selection as one callback."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_tokens.checks import check_numbers
from lightning_tokens.data.packing import SampleView
from lightning_tokens.modeling import ModelSpec, is_peft_model
from lightning_tokens.sharding import shards_with_fsdp2, warn_if_fsdp1
from lightning_tokens.sstoken.attention import AttentionProbe
from lightning_tokens.sstoken.formulas import minmax_per_sample, mix_scores, rank_correlation, select_top
from lightning_tokens.sstoken.history import (
    DisabledAdapters,
    EmaWeights,
    FrozenCopy,
    HistorySource,
    Precomputed,
    ReferenceModel,
)
from lightning_tokens.sstoken.precompute import samples_of
from lightning_tokens.sstoken.runaway import (
    RUNAWAY_RISE,
    RUNAWAY_WINDOW,
    RunawayDetector,
    RunawaySelection,
    runaway_message,
)
from lightning_tokens.token_loss import TokenLossCallback, TokenLossContext, TokenLossDispatcher, find_causal_lm

Mode = Literal["sstoken", "rho1", "loss", "attention", "random"]
History = Literal["base", "ema", "precomputed"]
MODES = ("sstoken", "rho1", "loss", "attention", "random")
HISTORIES = ("base", "ema", "precomputed")
OnRunaway = Literal["warn", "raise", "attention"]
ON_RUNAWAY = ("warn", "raise", "attention")


class TokenSelection(TokenLossCallback):
    """ssToken: train on the response tokens that matter, ranked by self-modulated and semantic signals.

    For each training micro-batch, every response token ``x_i`` of a sample gets

    - ``REL(x_i) = L_his(x_i) - L_cur(x_i)`` (retrospective excess loss: how much the current model improved
      on the token over the history model), min-max normalised over the sample's response tokens;
    - ``AttnScore(x_i)``: the head-mean attention mass from ``x_i``'s own query to the earlier context
      (real, non-target) positions at ``attention_layer``, recomputed for that one layer while the model
      keeps its own attention kernel;

    mixed as ``score = gamma * REL_norm + (1 - gamma) * AttnScore``. Each sample keeps its top
    ``ceil(ratio * n_response)`` tokens (ties: the earlier token), and the loss is the mean cross-entropy over
    the kept tokens of the micro-batch. Validation losses stay the plain next-token loss.

    Add it to any Trainer whose LightningModule calls a Hugging Face causal LM with ``labels``::

        Trainer(callbacks=[TokenSelection(ratio=0.6)])

    Logged every step under ``selection/``: ``kept_fraction``, ``gamma``, ``rel`` (mean REL),
    ``attention`` (mean AttnScore), ``rank_corr`` (Spearman correlation of REL and AttnScore, mean over
    samples), ``loss_history`` and ``loss_current`` (mean L_his and L_cur over response tokens), ``loss_kept`` and
    ``loss_dropped`` (mean L_cur of the kept and of the dropped response tokens; left out when the set is empty),
    ``negative_rel`` (share of response tokens with REL < 0, when REL was computed) and ``runaway`` (1 once runaway
    selection was detected, else 0), on the steps REL ranks (``"sstoken"`` after the warm-up, ``"loss"``) and on
    every step after the detector fired.

    Runaway selection: outside the paper's regime (its lr 1e-4 over 50k samples; measured here at lr 3e-4 and 1e-3
    on 1,024) ranking by REL keeps what the model learns fastest, the tokens it gets worse at get negative REL and
    are dropped for good, and training collapses (see :mod:`lightning_tokens.sstoken.runaway`). A
    :class:`~lightning_tokens.sstoken.runaway.RunawayDetector` watches ``loss_kept`` and ``loss_dropped`` per
    optimizer step while REL is in use and acts once, as ``on_runaway`` says. On the evidence protocol (5 seeds,
    noisy and clean data) it fired in all 45 collapsing runs and in none of the 65 healthy ones;
    ``on_runaway="attention"`` then took ssToken most of the way back to full SFT's held-out loss. The defaults
    stay the paper's: at its learning rate (1e-4) the selection did no harm. At 3e-4 with LoRA it was already worse
    than full SFT, mostly without a warning: above 1e-4 prefer ``mode="rho1"`` (a reference model fine-tuned on
    clean data) or ``mode="attention"``, or set ``on_runaway="attention"`` (docs: "When token selection hurts").

    Args:
        ratio: Fraction of each sample's response tokens kept (the paper's rho), in (0, 1]. Default ``0.6``.
        gamma: Weight of REL against the attention score (the paper's gamma), in [0, 1]. Default ``0.5``.
        warmup: Training steps during which gamma is 0 (attention only): a fraction of the steps when < 1, a
            number of optimizer steps when >= 1. Only for ``mode="sstoken"``. Default ``0.2``, counted once
            over the whole run (the first 20% of all steps); see ``warmup_per_epoch`` for the reference
            code's variant.
        warmup_per_epoch: Restart the warm-up at every epoch, as the reference code does (gamma is 0 for the
            first 10,000 samples of each epoch, 20% of its 50k set): a fraction is then of the epoch's batches,
            a number is of optimizer steps into the epoch. Default ``False`` (one warm-up at the start: with
            the paper's single epoch both are the same).
        attention_layer: Decoder layer whose attention scores tokens; negative counts from the end.
            Default ``-1`` (the last, as in the paper).
        mode: ``"sstoken"`` (the mix), ``"loss"`` (REL only, gamma 1, no warm-up), ``"attention"``
            (AttnScore only, gamma 0), ``"rho1"`` (Rho-1: keep the top ratio by ``L_cur - L_ref`` under
            ``reference``) or ``"random"`` (a random ratio of each sample). Default ``"sstoken"``.
        history: Where ``L_his`` comes from: ``"base"`` (the frozen initial weights: under LoRA/QLoRA the same
            model with adapters disabled, no copy; under full fine-tuning a frozen copy), ``"ema"`` (an
            exponential moving average of the trainable weights) or ``"precomputed"`` (``history_file``).
            Default ``"base"`` (the paper's choice).
        ema_decay: EMA decay ``a`` of ``theta_his <- a * theta_his + (1 - a) * theta``. The paper gives no
            value; default ``0.99``.
        history_quantization: Store the full-fine-tuning base copy as ``"int8"``, ``"nf4"`` or ``"fp4"``
            with bitsandbytes. Default ``None`` (same dtype as the model).
        history_file: Per-token loss file of ``lightning-tokens score``, for ``history="precomputed"``; it is
            checked against the training data at the start of fit. Default ``None``.
        reference: The reference model of ``mode="rho1"`` (same tokenizer). Default ``None``.
        seed: Seed of ``mode="random"``. Default ``0``.
        model_attribute: Dotted attribute path of the causal LM inside the LightningModule. Default ``None``:
            found automatically.
        keep_logits: Build the full ``(B, T, V)`` logits in training forwards again, for a ``training_step``
            that reads ``outputs.logits``. Default ``False``: the loss is computed from the final hidden state in
            chunks of target positions (see :mod:`lightning_tokens.lean_loss`), and reading them raises.
        on_runaway: What to do when runaway selection is detected (modes ``"sstoken"`` and ``"loss"``): ``"warn"``
            once with the step, the figures and what to do; ``"raise"`` :class:`RunawaySelection` with that
            message; ``"attention"`` warn, then select by attention alone (gamma 0) for the rest of the run.
            Default ``"warn"``.
        runaway_window: Optimizer steps in the detector's baseline (the first steps after the warm-up) and in
            the recent window compared with it. Default ``8``.
        runaway_rise: The detector fires when the dropped tokens' mean loss over the window is at least
            ``1 + runaway_rise`` times its baseline while the kept tokens' is at most its baseline. Default ``0.5``.
    """

    def __init__(
        self,
        ratio: float = 0.6,
        gamma: float = 0.5,
        warmup: float = 0.2,
        warmup_per_epoch: bool = False,
        attention_layer: int = -1,
        mode: Mode = "sstoken",
        history: History = "base",
        ema_decay: float = 0.99,
        history_quantization: Optional[str] = None,
        history_file: Optional[str] = None,
        reference: Optional[ModelSpec] = None,
        seed: int = 0,
        model_attribute: Optional[str] = None,
        keep_logits: bool = False,
        on_runaway: OnRunaway = "warn",
        runaway_window: int = RUNAWAY_WINDOW,
        runaway_rise: float = RUNAWAY_RISE,
    ) -> None:
        super().__init__(model_attribute, keep_logits)
        check_numbers("TokenSelection", ratio=(ratio, "in (0, 1]"), gamma=(gamma, "in [0, 1]"), warmup=(warmup, ">= 0"),
                      attention_layer=(attention_layer, "an integer"), ema_decay=(ema_decay, "in [0, 1)"),
                      seed=(seed, "an integer"), runaway_window=(runaway_window, "an integer >= 1"),
                      runaway_rise=(runaway_rise, "> 0"))
        if mode not in MODES:
            raise ValueError(f"TokenSelection.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if on_runaway not in ON_RUNAWAY:
            raise ValueError(f"TokenSelection.on_runaway must be one of {', '.join(ON_RUNAWAY)}, got {on_runaway!r}")
        if history not in HISTORIES:
            raise ValueError(f"TokenSelection.history must be one of {', '.join(HISTORIES)}, got {history!r}")
        if history_quantization not in (None, "int8", "nf4", "fp4"):
            raise ValueError(f"TokenSelection.history_quantization must be 'int8', 'nf4', 'fp4' or null, "
                             f"got {history_quantization!r}")
        if history == "precomputed" and mode in ("sstoken", "loss") and not history_file:
            raise ValueError("TokenSelection.history_file is required with history='precomputed'")
        if mode == "rho1" and reference is None:
            raise ValueError("TokenSelection.reference (a ModelSpec) is required with mode='rho1'")
        self.ratio, self.gamma, self.warmup = float(ratio), float(gamma), warmup
        self.warmup_per_epoch = bool(warmup_per_epoch)
        self.attention_layer, self.mode, self.history = attention_layer, mode, history
        self.ema_decay, self.history_quantization = ema_decay, history_quantization
        self.history_file, self.reference, self.seed = history_file, reference, seed
        self.on_runaway = on_runaway
        self.detector = RunawayDetector(runaway_window, runaway_rise)
        self._step_sums: Optional[torch.Tensor] = None  # this optimizer step's loss sums and counts, while REL is used
        self.probe: Optional[AttentionProbe] = None
        self.source: Optional[HistorySource] = None
        self.warmup_steps = int(warmup) if warmup >= 1 else 0
        self.epoch_warmup_batches = 0  # with warmup_per_epoch: batches of every epoch in the warm-up
        self.global_step = 0
        self.epoch_batch = 0
        self.forwards = 0
        self.rank = 0
        self.metrics: dict[str, float] = {}
        self._pending_state: Optional[dict] = None
        self._restored = False
        self._sharded = False  # training under FSDP2, which shards the model after setup

    # -- which signals a mode needs ----------------------------------------------------------------------
    @property
    def needs_history(self) -> bool:
        return self.mode in ("sstoken", "loss", "rho1")

    @property
    def needs_attention(self) -> bool:
        return self.mode in ("sstoken", "attention") or (self.mode == "loss" and self.on_runaway == "attention")

    def current_gamma(self) -> float:
        """The gamma in force now: 1 for ``"loss"``, 0 for ``"attention"``, during the warm-up and once
        ``on_runaway="attention"`` has acted."""
        if self.on_runaway == "attention" and self.detector.fired:
            return 0.0
        if self.mode == "loss":
            return 1.0
        if self.mode == "attention" or self.in_warmup:
            return 0.0
        return self.gamma

    @property
    def in_warmup(self) -> bool:
        """Whether the current batch is in the warm-up (of the run, or of its epoch with ``warmup_per_epoch``)."""
        if self.warmup_per_epoch:
            return self.epoch_batch < self.epoch_warmup_batches
        return self.global_step < self.warmup_steps

    # -- attaching ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, pl_module: Optional[nn.Module] = None,
               device: Optional[torch.device] = None, datamodule: Any = None) -> None:
        """Join ``model``'s loss dispatcher and build the probe and history source (``setup`` calls this).

        The history source is built once, on the first call: a frozen copy holds the weights of that moment.

        Args:
            model: The causal LM (or a PEFT wrapper of it).
            pl_module: The module owning it, searched for a PEFT wrapper. Default ``None``: ``model``.
            device: Where training runs (for a quantized history copy). Default ``None``: ``model``'s device.
            datamodule: Training data to check a precomputed history file against. Default ``None``.

        Raises:
            ValueError: A mode needing the attention score (``"sstoken"``, ``"attention"``) on a model whose attention
                at ``attention_layer`` does not go through transformers' attention interface (found by a forward of
                two tokens); the message names the model type and the modes that need no attention.
        """
        device = device or next(model.parameters()).device
        if self.needs_attention and self.probe is None:
            probe = AttentionProbe(model, self.attention_layer)
            probe.check(model)  # a model whose attention cannot be probed is refused here, not at the first step
            self.probe = probe
        if self.needs_history and self.source is None:
            self.source = self._build_source(model, pl_module or model)
            self.source.setup(model, pl_module or model, device)
            if isinstance(self.source, Precomputed) and datamodule is not None:
                samples = samples_of(datamodule)
                if samples is not None:
                    self.source.check_data(samples)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
        if self.dispatcher is None:
            self.dispatcher = TokenLossDispatcher.for_model(model)
        if self.probe is not None:
            self.probe.attach(self.dispatcher)
        self.dispatcher.add(self)

    def _build_source(self, model: nn.Module, owner: nn.Module) -> HistorySource:
        if self.mode == "rho1":
            return ReferenceModel(self.reference)
        if self.history == "precomputed":
            return Precomputed(self.history_file)
        if self.history == "ema":
            return EmaWeights(self.ema_decay, defer=self._sharded)  # sharded weights exist from on_train_start
        if is_peft_model(owner):
            if self.history_quantization is not None:
                raise ValueError("TokenSelection.history_quantization applies to full fine-tuning only: under "
                                 "LoRA the history model is the (already frozen) base with adapters disabled")
            return DisabledAdapters()
        return FrozenCopy(self.history_quantization)

    def detach(self) -> None:
        """Leave the dispatcher (``teardown`` calls this)."""
        if self.dispatcher is not None:
            self.dispatcher.remove(self)
            self.dispatcher = None

    # -- Lightning hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        warn_if_fsdp1(trainer, type(self).__name__)
        self._sharded = shards_with_fsdp2(trainer)
        self.rank = trainer.global_rank
        self.attach(find_causal_lm(pl_module, self.model_attribute), pl_module, trainer.strategy.root_device,
                    trainer.datamodule)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.detach()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.warmup_per_epoch and self.warmup >= 1:
            self.epoch_warmup_batches = int(self.warmup) * trainer.accumulate_grad_batches
        elif self.warmup_per_epoch:
            per_epoch = trainer.num_training_batches
            self.epoch_warmup_batches = round(self.warmup * per_epoch) if math.isfinite(per_epoch) else 0
        elif self.warmup < 1 and not self._restored:  # a resumed run keeps the warm-up it started with
            total = trainer.estimated_stepping_batches
            self.warmup_steps = round(self.warmup * total) if math.isfinite(total) else 0
        self.global_step = trainer.global_step
        if self.source is not None:
            self.source.on_train_start()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.global_step, self.epoch_batch = trainer.global_step, batch_idx

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stepped = trainer.global_step != self.global_step
        if stepped and self.source is not None:
            self.source.after_optimizer_step(pl_module)
        if stepped and self._step_sums is not None:
            self._check_runaway(trainer, trainer.global_step)
        self.global_step = trainer.global_step
        # the detector's verdict once the step is done, where REL ranked the forward and on every step after it fired
        if self.metrics and ("negative_rel" in self.metrics or self.detector.fired):
            self.metrics["runaway"] = torch.tensor(float(self.detector.fired))
        if self.metrics:
            values = torch.stack([v.float().to(pl_module.device) for v in self.metrics.values()]).tolist()
            logged = {f"selection/{k}": v for k, v in zip(self.metrics, values) if math.isfinite(v)}
            pl_module.log_dict(logged, on_step=True, on_epoch=False)
            self.metrics = {}

    def _check_runaway(self, trainer: Trainer, step: int) -> None:
        # token-weighted means over the step's micro-batches and every rank, so that all ranks decide the same
        sums = trainer.strategy.reduce(self._step_sums, reduce_op="sum").tolist()
        self._step_sums = None
        kept_sum, kept_n, dropped_sum, dropped_n, negative_n, response_n = sums
        if kept_n == 0 or dropped_n == 0:
            return
        if self.detector.update(step, kept_sum / kept_n, dropped_sum / dropped_n):
            message = runaway_message(self.detector, negative_n / response_n)
            if self.on_runaway == "raise":
                raise RunawaySelection(message)
            if self.on_runaway == "attention":
                message += " Selecting by attention alone (gamma 0) from now on (on_runaway='attention')."
            rank_zero_warn(message)

    # -- the selection -----------------------------------------------------------------------------------
    @override
    def reshape_token_loss(self, ctx: TokenLossContext) -> None:
        response = ctx.target_mask
        # Everything per sample (min-max, top-k, rank correlation) runs on one row per sample, so a packed row's
        # samples are selected exactly as they would be padded.
        samples = SampleView(response, ctx.target_segments)
        current = ctx.token_loss.detach()
        n = response.sum().clamp_min(1)
        stats = {"loss_current": (current * response).sum() / n}
        if self.mode == "random":
            generator = torch.Generator().manual_seed(hash((self.seed, self.rank, self.forwards)) % (1 << 63))
            score = torch.rand(response.shape, generator=generator).to(response.device)
        elif self.mode == "rho1":
            reference = self.source.token_loss(ctx)
            score = current - reference
            stats["loss_history"] = (reference * response).sum() / n
        else:
            gamma = self.current_gamma()
            rel_norm = attention = torch.zeros_like(current)
            if gamma > 0:
                history = self.source.token_loss(ctx)
                rel = history - current
                rel_norm = samples.collapse(minmax_per_sample(samples.expand(rel), samples.response))
                negative = ((rel < 0) & response).sum()
                stats.update(loss_history=(history * response).sum() / n, rel=(rel * response).sum() / n,
                             negative_rel=negative / n)
            if gamma < 1:
                attention = self.probe.scores(ctx.captured, ctx.attention_mask, ctx.context_mask, ctx.segments)[:, 1:]
                stats["attention"] = (attention * response).sum() / n
            if 0 < gamma < 1:
                stats["rank_corr"] = rank_correlation(samples.expand(rel), samples.expand(attention), samples.response)
            score = mix_scores(rel_norm, attention, gamma)
            stats["gamma"] = torch.tensor(gamma)
        keep = samples.collapse(select_top(samples.expand(score), samples.response, self.ratio))
        ctx.weights = ctx.weights * keep
        dropped = response & ~keep
        kept_n, dropped_n = keep.sum(), dropped.sum()
        kept_sum, dropped_sum = (current * keep).sum(), (current * dropped).sum()
        stats.update(kept_fraction=kept_n / n, loss_kept=kept_sum / kept_n, loss_dropped=dropped_sum / dropped_n)
        if "negative_rel" in stats:  # REL ranks this batch, so the loop can form: the detector counts it
            step = torch.stack([kept_sum, kept_n, dropped_sum, dropped_n, negative, response.sum()]).float()
            self._step_sums = step if self._step_sums is None else self._step_sums + step
        self.forwards += 1
        self.metrics = {k: v.detach() for k, v in stats.items()}  # read (one sync) when logged

    # -- checkpoint state --------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, history=self.history, ratio=self.ratio, gamma=self.gamma)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"global_step": self.global_step, "forwards": self.forwards, "warmup_steps": self.warmup_steps,
                 "runaway": self.detector.state_dict()}
        if self.source is not None:
            state["history"] = self.source.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.needs_history and self.source is None:
            self._pending_state = state_dict  # restored once the history source exists
            return
        self._pending_state = None
        self.global_step = state_dict["global_step"]
        self.forwards = state_dict["forwards"]
        self.warmup_steps = state_dict["warmup_steps"]
        self._restored = True
        if "runaway" in state_dict:  # checkpoints written before the detector existed have none
            self.detector.load_state_dict(state_dict["runaway"])
        if self.source is not None and "history" in state_dict:
            self.source.load_state_dict(state_dict["history"])
