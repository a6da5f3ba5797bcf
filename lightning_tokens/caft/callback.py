"""ConceptAwareFineTuning: stage 2 of CAFT as a callback on any fine-tuning loop of a causal LM.

The training loss becomes ``L = CE_0 + sum_k beta * gamma^k * s(p) * CE_k`` where ``CE_0`` is the loss the
loop already computes and ``CE_k`` is head ``k``'s cross-entropy on the same response tokens, ``k`` places
further ahead. The heads are registered on the LightningModule as ``caft_heads`` (so they follow it to the
device, reach its optimizer when trainable and are saved in its checkpoints) and never touch the causal LM,
so whatever the module exports is the plain model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_tokens.caft.heads import WEIGHTS_NAME, Architecture, MultiTokenHeads, Trunk, head_variant
from lightning_tokens.caft.loss import head_losses, weighted_sum
from lightning_tokens.caft.schedule import parse_schedule, schedule_value
from lightning_tokens.checks import check_numbers
from lightning_tokens.modeling import causal_lm_of, decoder_layers, is_peft_model
from lightning_tokens.sharding import average_gradients, data_parallel_mesh, shards_with_fsdp2
from lightning_tokens.token_loss import ATTACHED_MODULES_KEY, TokenLossCallback, TokenLossContext, find_causal_lm

HEADS_ATTRIBUTE = "caft_heads"
_TRUNK_KEY = "caft_trunk"
_FINAL_KEY = "caft_final_hidden"


class ConceptAwareFineTuning(TokenLossCallback):
    """Concept-aware fine-tuning (CAFT, stage 2): multi-token auxiliary losses from pre-trained heads.

    Add it to the Trainer of an existing loop whose ``training_step`` calls a Hugging Face causal LM with
    ``labels`` and returns ``outputs.loss``; nothing else changes. Validation losses stay the plain
    next-token loss. For a mixture-of-experts model run with ``output_router_logits``, ``CE_0`` comes with the
    model's router load-balancing term, as transformers adds it; the heads' own routers (a ``"layer"`` head copies
    a decoder layer, MoE block included) get no such term.

    Logged every step: ``train/caft_loss`` (the weighted auxiliary term), ``train/caft_schedule`` (s(p)),
    and per head ``train/caft_head{k}_loss`` and ``train/caft_head{k}_acc`` (top-1 accuracy).

    Args:
        heads_path: Directory written by :meth:`MultiTokenHeads.save` or by :class:`MultiTokenHeadsModule`
            (stage 1). Default ``None``: with ``architecture="mtp"``, the MTP layers of the model's own checkpoint
            (:meth:`MultiTokenHeads.from_model`; trained already, so no stage 1); otherwise fresh heads built from
            the model's last layer, which the paper found to give no gain, with a warning.
        num_heads: Number of heads K when building fresh heads. Default ``4``. For the checkpoint's MTP layers,
            ``None`` takes as many depths as it has.
        architecture: ``"layer"``, ``"resblock"`` or ``"mtp"`` (see ``heads_path``). Default ``"layer"``. Write
            fine-tuned MTP layers back into the model's checkpoint layout with
            :func:`~lightning_tokens.caft.mtp.export_mtp`.
        beta: Weight of the auxiliary losses (paper: ``caft_heads_coefficient``). Default ``0.01``.
        gamma: Decay per head (paper: ``caft_decay_coefficient``). Default ``0.8``.
        schedule: s(p): ``"rsine"``, ``"sine"``, ``"linear"``, ``"constant"`` or ``"sine_r"`` (also spelled
            ``"sine_0.3"``); see :func:`~lightning_tokens.caft.schedule.schedule_value`. Default ``"rsine"``.
        sine_ratio: ``r`` of ``sine_r``. Default ``0.2`` (the reference code has no default: it reads r from
            the schedule's name).
        train_heads: Train the heads too (reference code: ``--finetune-heads``). Default ``False``: frozen, under
            LoRA and full fine-tuning alike; the auxiliary gradient still flows through them into the model.
        freeze_lm_head: Freeze the ``lm_head`` under full fine-tuning (reference code: ``--freeze-unembedding``).
            Default ``False``. A ``lm_head`` tied to the input embeddings is left trainable, with a warning.
        chunk_size: Target positions projected onto the vocabulary at once. Default ``1024``.
        require_heads: Fail when ``heads_path`` holds no heads. Default ``True``; ``False`` falls back to fresh
            heads with a warning (lets a stage-2 config run before stage 1 has been run).
        model_attribute: Dotted path of the causal LM in the LightningModule. Default ``None``: found.
        keep_logits: Build the full logits in training forwards again, for a ``training_step`` that reads
            ``outputs.logits``. Default ``False`` (they are never built; reading them raises).
    """

    def __init__(
        self,
        heads_path: Optional[str] = None,
        num_heads: Optional[int] = 4,
        architecture: Architecture = "layer",
        beta: float = 0.01,
        gamma: float = 0.8,
        schedule: str = "rsine",
        sine_ratio: float = 0.2,
        train_heads: bool = False,
        freeze_lm_head: bool = False,
        chunk_size: int = 1024,
        require_heads: bool = True,
        model_attribute: Optional[str] = None,
        keep_logits: bool = False,
    ) -> None:
        super().__init__(model_attribute, keep_logits)
        check_numbers("ConceptAwareFineTuning", num_heads=(num_heads, "an integer >= 1 or None"), beta=(beta, ">= 0"),
                      gamma=(gamma, "in (0, 1]"), sine_ratio=(sine_ratio, "in (0, 1]"),
                      chunk_size=(chunk_size, "an integer >= 1"))
        self.schedule, self.sine_ratio = parse_schedule(schedule, sine_ratio)
        self.heads_path, self.num_heads, self.architecture = heads_path, num_heads, architecture
        self.beta, self.gamma = beta, gamma
        self.train_heads, self.freeze_lm_head, self.chunk_size = train_heads, freeze_lm_head, chunk_size
        self.require_heads = require_heads
        self.total_steps: Optional[int] = None
        self.step = 0
        self._heads: Optional[MultiTokenHeads] = None
        self._last: dict[str, Any] = {}

    # -- wiring ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = find_causal_lm(pl_module, self.model_attribute)
        heads = getattr(pl_module, HEADS_ATTRIBUTE, None)
        if heads is None:
            heads = self._build_heads(model)  # before joining the dispatcher: a bad path leaves nothing behind
            pl_module.add_module(HEADS_ATTRIBUTE, heads)
        heads.requires_grad_(bool(self.train_heads))

        lm_head = causal_lm_of(model).get_output_embeddings()
        if not is_peft_model(pl_module) and self.freeze_lm_head:
            embeddings = causal_lm_of(model).get_input_embeddings()
            if embeddings is not None and embeddings.weight is lm_head.weight:
                rank_zero_warn("ConceptAwareFineTuning: lm_head is tied to the input embeddings; left trainable")
            else:
                lm_head.requires_grad_(False)
        self._heads = heads
        super().setup(trainer, pl_module, stage)
        self.dispatcher.capture_inputs(decoder_layers(model)[-1], _TRUNK_KEY)
        if heads.variant.reads_final_hidden:
            self.dispatcher.capture_inputs(causal_lm_of(model).get_output_embeddings(), _FINAL_KEY)

    def _build_heads(self, model) -> MultiTokenHeads:
        if self.heads_path is None and head_variant(self.architecture).in_checkpoint:
            try:
                return MultiTokenHeads.from_model(model, self.num_heads)
            except ValueError as error:
                if self.require_heads:
                    raise
                rank_zero_warn(f"ConceptAwareFineTuning: {error} (require_heads=False); the MTP layers start untrained")
        if self.heads_path is not None:
            if self.require_heads or (Path(self.heads_path) / WEIGHTS_NAME).is_file():
                return MultiTokenHeads.load(self.heads_path, model)
            rank_zero_warn(f"ConceptAwareFineTuning: no heads in {self.heads_path} (require_heads=False); the heads "
                           "start untrained. Run stage 1 (MultiTokenHeadsModule) first for CAFT proper")
        else:
            rank_zero_warn("ConceptAwareFineTuning: no heads_path, so the heads start untrained; CAFT expects heads "
                           "pre-trained in stage 1 (MultiTokenHeadsModule)")
        return MultiTokenHeads(model, num_heads=self.num_heads or 4, architecture=self.architecture)

    # -- schedule --------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.total_steps is None:
            total = (trainer.max_steps if trainer.max_steps and trainer.max_steps > 0
                     else trainer.estimated_stepping_batches)
            self.total_steps = max(1, int(total))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.step = trainer.global_step

    @property
    def schedule_weight(self) -> float:
        """s(p) at the current step."""
        return schedule_value(self.schedule, self.step / max(1, self.total_steps or 1), self.sine_ratio)

    # -- the loss --------------------------------------------------------------------------------------
    @override
    def reshape_token_loss(self, ctx: TokenLossContext) -> None:
        if _TRUNK_KEY not in ctx.captured or self._heads is None:
            raise RuntimeError("ConceptAwareFineTuning: the last decoder layer's input was not captured")
        trunk = Trunk.from_call(*ctx.captured[_TRUNK_KEY])
        if self._heads.variant.reads_final_hidden:
            hidden = ctx.hidden if ctx.hidden is not None else ctx.captured[_FINAL_KEY][0][0]
            trunk = Trunk(hidden, None, trunk.position_ids, ctx.input_ids)
        losses = head_losses(self._heads, ctx.model, trunk, ctx.labels, ctx.attention_mask, self.chunk_size,
                             ctx.segments)
        weight = self.schedule_weight
        auxiliary = self.beta * weight * weighted_sum(losses, self.gamma)
        ctx.extra_losses["caft"] = auxiliary
        # detached tensors, not floats: logging them costs no device synchronisation per head
        self._last = {"caft_loss": auxiliary.detach(), "caft_schedule": weight}
        for k, item in enumerate(losses, start=1):
            self._last[f"caft_head{k}_loss"] = item.loss.detach()
            self._last[f"caft_head{k}_acc"] = item.accuracy

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under FSDP2 separate unembeddings stay whole on every rank (the chunked loss reads them as weights, outside
        # a module call FSDP2 could gather around): average their gradients, as DDP would.
        mesh = data_parallel_mesh(pl_module) if shards_with_fsdp2(trainer) else None
        if mesh is not None and self._heads is not None and self._heads.unembeddings is not None:
            average_gradients(self._heads.unembeddings.parameters(), mesh)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        for name, value in self._last.items():
            pl_module.log(f"train/{name}", value, on_step=True, on_epoch=False)
        self._last = {}

    # -- state -----------------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        attached = checkpoint.setdefault(ATTACHED_MODULES_KEY, [])
        if HEADS_ATTRIBUTE not in attached:
            attached.append(HEADS_ATTRIBUTE)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "step": self.step, "schedule": self.schedule,
                "sine_ratio": self.sine_ratio, "beta": self.beta, "gamma": self.gamma}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps = state_dict.get("total_steps", self.total_steps)
        self.step = state_dict.get("step", self.step)
