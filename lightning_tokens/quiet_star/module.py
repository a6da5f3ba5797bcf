"""QuietSTaRModule: continued pretraining with Quiet-STaR thoughts, and thoughtful generation."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from tokenizers import AddedToken
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_tokens.checkpoints import check_checkpoint_file
from lightning_tokens.checks import check_numbers
from lightning_tokens.data.packing import is_packed, real_tokens, segment_ids
from lightning_tokens.lean_loss import IGNORE_INDEX, OutputProjection
from lightning_tokens.modeling import ModelSpec, causal_lm_of, load_causal_lm
from lightning_tokens.optim import OptimizerConfig, ResumesExactly, configure, parameter_groups
from lightning_tokens.quantization import restore_4bit_quant_states
from lightning_tokens.quiet_star.generate import ThoughtfulOutput, thoughtful_generate
from lightning_tokens.quiet_star.loss import QuietSTaRLoss, next_token_targets, quiet_star_loss
from lightning_tokens.quiet_star.mixing import MixingHead, ThoughtEmbeddings
from lightning_tokens.quiet_star.parallel import check_supported, parallel_thoughts
from lightning_tokens.quiet_star.positions import ThinkAt, check_think_at, thought_candidates
from lightning_tokens.reasoning import check_answer
from lightning_tokens.sharding import (
    ClipsMixedGradients,
    average_gradients,
    call_as_forward,
    data_parallel_mesh,
    full_state_dict,
    is_sharded,
    shard_causal_lm,
    warn_if_fsdp1,
)
from lightning_tokens.token_loss import model_loss_terms, router_loss

#: The paper's optimiser: AdamW at 1e-6, weight decay 0.001, 20 warm-up steps (then constant: the
#: reference's linear decay over 100k steps is flat over its ~100 steps).
PAPER_OPTIMIZER = OptimizerConfig(lr=1e-6, weight_decay=0.001, warmup=20, schedule="constant")


class QuietSTaRModule(ResumesExactly, ClipsMixedGradients, LightningModule):
    """Quiet-STaR (Zelikman et al., 2024): the model learns to think before every token from plain text.

    After every position the model samples ``n_thoughts`` thoughts ``<sot> t_1 .. t_m <eot>`` in parallel
    (:mod:`lightning_tokens.quiet_star.parallel`), predicts the next ``n_ahead_talk`` true tokens after each,
    and mixes those predictions with its thought-free ones through a mixing head. Loss (see
    :mod:`lightning_tokens.quiet_star.loss`): half base NLL, half mixed NLL, plus REINFORCE on the thought
    tokens with the reward above the mean of the position's thoughts.

    The start/end-of-thought tokens are added to the tokenizer (and to the embedding matrix when it has no
    free rows). Their input embeddings live in :class:`ThoughtEmbeddings`, trained ``embedding_scale``
    times faster, and are trainable under LoRA too, like the mixing head; both are saved in checkpoints.
    Training thoughts are drawn from a generator seeded per batch (from a seed drawn at the first step and kept in
    checkpoints), so a resumed run, mid-epoch too, thinks and trains as the uninterrupted run
    (:class:`~lightning_tokens.optim.ResumesExactly`).

    Logged per training step: ``train/loss``, ``train/nll``, ``train/base_nll``, ``train/mixed_nll``,
    ``train/policy_loss``, ``train/mixing_weight``, ``train/reward``, ``train/difficult_base_nll`` and
    ``train/difficult_mixed_nll`` (NLL on the top decile of base loss). A mixture-of-experts model run with
    ``output_router_logits`` adds its router load-balancing term of the text pass (the model's forward on the batch,
    ``router_aux_loss_coef * aux_loss`` as transformers adds it; the thought passes' routing is not balanced) to
    the loss, logged as ``train/router_loss``. Validation logs the plain ``val/loss`` (no thoughts, comparable with
    :class:`CausalLMModule`), the same parts with greedy thoughts under ``val/``, and ``val/exact_match`` of
    thoughtful generation when the batches carry answers; ``test`` logs the same under ``test/``.

    Args:
        model: What model to load. Default ``ModelSpec()`` (a tiny Llama). Attention must be ``"sdpa"`` or
            ``"eager"``, without gradient checkpointing.
        optimizer: Optimizer and schedule. Default :data:`PAPER_OPTIMIZER` (AdamW 1e-6, weight decay 0.001,
            20 warm-up steps, constant).
        n_thoughts: Thoughts sampled per position (paper ``n_passes``). Default ``2``.
        thought_length: Sampled tokens per thought, between the delimiters. The reference's ``n_ahead``
            counts the text pass and both delimiters: ``n_ahead = thought_length + 3``. Default ``9``
            (``n_ahead = 12``, the reference's training script).
        n_ahead_talk: True tokens predicted after each thought (paper ``n_ahead_talk``). Default ``4``.
        base_loss_weight: Weight of the base NLL, the mixed NLL taking the rest (reference
            ``original_loss_weight``). Default ``0.5``.
        policy_weight: Weight of the REINFORCE term (reference ``policy_loss_beta``). Default ``1e6``.
        reinforce_temperature: Temperature of the policy log-probabilities. Default ``3.0``.
        thought_temperature: Temperature thoughts are sampled at in training (reference
            ``gumbel_temperature``); validation thinks greedily. Default ``1.0``.
        embedding_scale: Learning-rate multiplier of the two thought-token embeddings. Default ``100.0``.
        thought_init: Text whose first token's embedding initialises both delimiters. Default ``"---"``.
        start_token: The start-of-thought token. Default ``"<|startthought|>"``.
        end_token: The end-of-thought token. Default ``"<|endthought|>"``.
        train_on: ``"all"``: every real next token is a target (plain-text continued pretraining, the
            paper); ``"labels"``: only tokens labelled in the batch (e.g. completions). Default ``"all"``.
        init_checkpoint: A Lightning checkpoint of a :class:`CausalLMModule` (e.g. the SFT quickstart's
            ``last.ckpt``) whose model weights are loaded before the thought tokens are added. Default ``None``.
        max_new_tokens: Length of thoughtful generation in validation. Default ``32``.
        generation_batches: Validation batches scored by thoughtful generation. Default ``1``; ``0`` turns
            it off, ``None`` scores all.
        difficult_fraction: Share of targets, highest base loss first, logged as difficult. Default ``0.1``.
        think_at: Where thoughts are sampled in training and validation (see :mod:`.positions`):
            ``"all"`` positions (the paper); an ``int`` ``k``: the ``k`` positions per row whose next token the
            model without thoughts is least sure of (highest entropy); a ``float`` ``s`` in (0, 1]: that share of
            each row's positions. The thought and talk passes run on the chosen positions alone, so their cost
            scales with them. The mixed NLL, reward, REINFORCE term and difficult-token NLLs are taken over the
            chosen positions; the base NLL stays over every target (the text pass reads them all anyway).
            Thoughtful generation still thinks before every token. Default ``"all"``.
    """

    def __init__(
        self,
        model: Optional[ModelSpec] = None,
        optimizer: Optional[OptimizerConfig] = None,
        n_thoughts: int = 2,
        thought_length: int = 9,
        n_ahead_talk: int = 4,
        base_loss_weight: float = 0.5,
        policy_weight: float = 1e6,
        reinforce_temperature: float = 3.0,
        thought_temperature: float = 1.0,
        embedding_scale: float = 100.0,
        thought_init: str = "---",
        start_token: str = "<|startthought|>",
        end_token: str = "<|endthought|>",
        train_on: Literal["all", "labels"] = "all",
        init_checkpoint: Optional[str] = None,
        max_new_tokens: int = 32,
        generation_batches: Optional[int] = 1,
        difficult_fraction: float = 0.1,
        think_at: ThinkAt = "all",
    ) -> None:
        super().__init__()
        check_numbers("QuietSTaRModule", n_thoughts=(n_thoughts, "an integer >= 1"),
                      thought_length=(thought_length, "an integer >= 1"),
                      n_ahead_talk=(n_ahead_talk, "an integer >= 1"),
                      base_loss_weight=(base_loss_weight, "in [0, 1]"), policy_weight=(policy_weight, ">= 0"),
                      reinforce_temperature=(reinforce_temperature, "> 0"),
                      thought_temperature=(thought_temperature, ">= 0"), embedding_scale=(embedding_scale, "> 0"),
                      max_new_tokens=(max_new_tokens, "an integer >= 0"),
                      generation_batches=(generation_batches, "an integer >= 0 or None"),
                      difficult_fraction=(difficult_fraction, "in [0, 1]"))
        if train_on not in ("all", "labels"):
            raise ValueError(f"QuietSTaRModule.train_on must be 'all' or 'labels', got {train_on!r}")
        self.spec = model if model is not None else ModelSpec()
        if self.spec.gradient_checkpointing:
            raise ValueError("QuietSTaRModule: ModelSpec.gradient_checkpointing must be false (it re-runs each "
                             "layer in the backward, outside the thought passes whose keys it needs)")
        if "flash" in (self.spec.attn_implementation or ""):
            raise ValueError(f"QuietSTaRModule: ModelSpec.attn_implementation {self.spec.attn_implementation!r} "
                             "cannot take the 4D thought mask; use 'sdpa' or 'eager'")
        self.optim = optimizer if optimizer is not None else PAPER_OPTIMIZER
        self.n_thoughts, self.thought_length, self.n_ahead_talk = n_thoughts, thought_length, n_ahead_talk
        self.base_loss_weight, self.policy_weight = base_loss_weight, policy_weight
        self.reinforce_temperature, self.thought_temperature = reinforce_temperature, thought_temperature
        self.train_on, self.difficult_fraction = train_on, difficult_fraction
        self.think_at = check_think_at(think_at, "QuietSTaRModule.think_at")
        self.max_new_tokens, self.generation_batches = max_new_tokens, generation_batches
        self.save_hyperparameters()

        self.model, self.tokenizer = load_causal_lm(self.spec)
        if init_checkpoint is not None:
            _load_module_checkpoint(self.model, init_checkpoint)
        lm = causal_lm_of(self.model)
        check_supported(lm)
        initial = _initial_embedding(lm, self.tokenizer, thought_init)
        self.start_id, self.end_id = _add_thought_tokens(lm, self.tokenizer, start_token, end_token, initial)
        self.thought_embeddings = ThoughtEmbeddings(initial, embedding_scale)
        self.mixing_head = MixingHead(lm.config.get_text_config().hidden_size)
        self.register_buffer("forbidden_ids", torch.tensor([self.start_id, self.end_id]), persistent=False)
        self.val_loss = MeanMetric()
        self.val_parts = torch.nn.ModuleDict({name: MeanMetric() for name in _PARTS})
        self.val_exact_match = MeanMetric()
        self._thought_seed: Optional[int] = None  # drawn at the first training step, kept in checkpoints

    # -- the method ------------------------------------------------------------------------------------
    @property
    def lm(self):
        """The transformers causal LM inside ``self.model``."""
        return causal_lm_of(self.model)

    def quiet_star(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor] = None,
                   temperature: Optional[float] = None, position_ids: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> QuietSTaRLoss:
        """The Quiet-STaR loss of a batch.

        A packed batch (``position_ids`` restarting at every sample, no ``attention_mask``) is thought about
        sample by sample: no thought or talk step reads or predicts another sample's tokens.

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)`` 1 on real tokens, or ``None`` (all real, or a packed batch).
            labels: ``(B, L)`` labels, read with ``train_on="labels"``. Default ``None``.
            temperature: Temperature the thoughts are sampled at. Default ``None``: ``thought_temperature``.
            position_ids: ``(B, L)`` position ids of a packed batch. Default ``None``.
            generator: Where the thoughts' samples are drawn from. Default ``None``: torch's global generator
                (training steps pass one seeded per batch, so that a resumed run draws the same thoughts).
        """
        return self._gathered(self._quiet_star, input_ids, attention_mask, labels, temperature, position_ids,
                              generator)[1]

    def _gathered(self, function: Any, *args: Any) -> Any:
        """``function(*args)``; for a model sharded by FSDP2, run as its forward (the passes and generation call
        the model's pieces, and FSDP2 gathers its root around them)."""
        if is_sharded(self.model):
            return call_as_forward(self.model, function, *args)
        return function(*args)

    def _quiet_star(self, input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
                    temperature: Optional[float], position_ids: Optional[Tensor],
                    generator: Optional[torch.Generator]) -> tuple[Tensor, QuietSTaRLoss]:
        """:meth:`quiet_star`, returning ``(loss, output)``: the loss in a tuple, where FSDP2 registers its backward."""
        lm = self.lm
        segments, given_mask = None, attention_mask
        if attention_mask is None:
            if not is_packed(position_ids):
                attention_mask = torch.ones_like(input_ids)
                position_ids = None
            else:
                segments = segment_ids(position_ids)
                attention_mask = real_tokens(segments).long()
        targets = next_token_targets(input_ids, attention_mask, labels if self.train_on == "labels" else None, segments)
        start, end = self.thought_embeddings()
        passes = parallel_thoughts(
            lm, input_ids, attention_mask, start, end,
            self.forbidden_ids, self.n_thoughts, self.thought_length, self.n_ahead_talk,
            temperature=self.thought_temperature if temperature is None else temperature,
            pad_token_id=self.tokenizer.pad_token_id or 0, generator=generator,
            position_ids=position_ids if segments is not None else None, think_at=self.think_at,
            candidates=None if self.think_at == "all" else thought_candidates(targets, self.n_ahead_talk, segments),
        )
        out = quiet_star_loss(passes, OutputProjection(lm), self.mixing_head, targets, self.forbidden_ids,
                              self.n_thoughts, self.base_loss_weight, self.policy_weight,
                              self.reinforce_temperature, self.difficult_fraction)
        # the router term the model's own forward on the batch adds (given mask: none when packed, as transformers)
        router = router_loss(lm, passes.router_logits, given_mask)
        if router is not None:
            out.loss, out.router_loss = out.loss + router, router.detach()
        return out.loss, out

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.quiet_star(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"),
                              position_ids=batch.get("position_ids"), generator=self._thought_generator(batch_idx))
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"Quiet-STaR loss is {out.loss.item()} at step {self.global_step}")
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.metrics().items():
            if name != "loss":
                self.log(f"train/{name}", value, prog_bar=name == "mixed_nll")
        return out.loss

    # -- validation ------------------------------------------------------------------------------------
    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        """Plain next-token loss, the Quiet-STaR parts and exact match, logged as ``<stage>/...``; validation and
        test never run at once, so they share the metric objects."""
        plain = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        nll = plain.loss - sum(model_loss_terms(self.model, plain).values())  # without a router term, as CausalLMModule
        self.val_loss.update(nll, weight=(batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        out = self.quiet_star(batch["input_ids"], batch["attention_mask"], batch.get("labels"), temperature=0.0)
        for name in _PARTS:
            self.val_parts[name].update(getattr(out, name))
            self.log(f"{stage}/{name}", self.val_parts[name])
        wanted = self.generation_batches is None or batch_idx < self.generation_batches
        if "answers" in batch and wanted and self.max_new_tokens > 0:
            output = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
            prompt_length = batch["prompt_input_ids"].shape[1]
            for row, answer in zip(output.sequences[:, prompt_length:].tolist(), batch["answers"]):
                if answer is not None:
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    self.val_exact_match.update(float(check_answer(text, answer)))
            self.log(f"{stage}/exact_match", self.val_exact_match, prog_bar=True)

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> ThoughtfulOutput:
        """Thoughtful generation (:func:`thoughtful_generate`) with this module's model, head and tokens.

        Args:
            input_ids: ``(B, T)`` left-padded prompts.
            attention_mask: ``(B, T)`` their mask. Default ``None``: all ones.
            **kwargs: Further :func:`thoughtful_generate` arguments (``max_new_tokens`` defaults to the
                module's, ``thought_length`` to the training one, ``return_thoughts``, temperatures...).
        """
        options = dict(max_new_tokens=self.max_new_tokens, thought_length=self.thought_length,
                       eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id or 0)
        options.update(kwargs)

        def generate(input_ids: Tensor, attention_mask: Optional[Tensor]) -> tuple[ThoughtfulOutput]:
            start, end = self.thought_embeddings()  # (2, d): the two rows
            return (thoughtful_generate(self.model, self.mixing_head, start, end, self.forbidden_ids, input_ids,
                                        attention_mask, **options),)

        return self._gathered(generate, input_ids, attention_mask)[0]  # sharded: every rank generates

    # -- optimisation and export -----------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2), shard the model (see :mod:`lightning_tokens.sharding`) as one unit.

        The thought passes run every decoder layer once per pass, and their backward passes interleave through the
        KV cache (a layer's weights are still needed after one pass's backward is done), so a unit per layer
        would be resharded while in use: the model is gathered once per step instead (FSDP2 gathers it around
        the passes, which run as its forward), and its gradients and optimizer state stay sharded. The mixing head
        and the thought embeddings, small, stay whole on every rank and have their gradients averaged after each
        backward. Under any other strategy, nothing happens.
        """
        warn_if_fsdp1(self._trainer, type(self).__name__)
        mesh = data_parallel_mesh(self)
        if mesh is not None:
            shard_causal_lm(self.model, mesh, self.trainer.precision, layers=False)

    @override
    def on_after_backward(self) -> None:
        mesh = data_parallel_mesh(self)
        if mesh is not None and is_sharded(self.model):
            average_gradients([*self.mixing_head.parameters(), *self.thought_embeddings.parameters()], mesh)

    @override
    def configure_optimizers(self) -> dict:
        groups = parameter_groups(self.named_parameters(), self.optim.weight_decay)
        return configure(self.optim, groups, self.total_training_steps())

    def _thought_generator(self, batch_idx: int) -> torch.Generator:
        """The generator of a training batch's thoughts, seeded by the run's thought seed, the epoch, the batch and the
        rank: a resumed run samples what the uninterrupted one did, whatever else drew from torch's generators."""
        if self._thought_seed is None:  # drawn from the global generator (seed_everything), the same on every rank
            self._thought_seed = int(self.trainer.strategy.broadcast(int(torch.randint(2**62, ())), src=0))
        key = f"{self._thought_seed}/{self.current_epoch}/{batch_idx}/{self.global_rank}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return torch.Generator(self.device).manual_seed(seed)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["thought_seed"] = self._thought_seed

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._thought_seed = checkpoint.get("thought_seed")
        restore_4bit_quant_states(self, checkpoint.get("state_dict", {}))

    def export(self, path: str | Path) -> Path:
        """Write the model and tokenizer (``save_pretrained``, delimiter rows set to the trained embeddings)
        and ``quiet_star.pt`` (mixing head, thought embeddings, settings) into ``path``.

        Sharded by FSDP2, every rank must call it (the weights are gathered); rank 0 writes them from an unsharded
        twin of this module on its CPU.
        """
        path = Path(path)
        if is_sharded(self.model):
            import torch.distributed as dist

            state = full_state_dict(self)
            if dist.get_rank() == 0:
                with torch.random.fork_rng():  # building the twin draws initialisations
                    twin = type(self)(**self.hparams)
                twin.load_state_dict(state)
                twin.export(path)
            dist.barrier()
            return path
        with torch.no_grad():
            rows = self.lm.get_input_embeddings().weight
            rows[[self.start_id, self.end_id]] = self.thought_embeddings().to(rows.dtype)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        torch.save({"mixing_head": self.mixing_head.state_dict(),
                    "thought_embeddings": self.thought_embeddings.state_dict(),
                    "hparams": dict(self.hparams)}, path / "quiet_star.pt")
        return path


_PARTS = ("base_nll", "mixed_nll", "mixing_weight", "reward", "difficult_base_nll", "difficult_mixed_nll")


def _initial_embedding(lm, tokenizer, text: str) -> Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"QuietSTaRModule.thought_init: {text!r} tokenizes to no tokens")
    return lm.get_input_embeddings().weight[ids[0]].detach().float().clone()


def _add_thought_tokens(lm, tokenizer, start: str, end: str, initial: Tensor) -> tuple[int, int]:
    """Add the delimiters to the tokenizer (special: skipped when decoding) and, if needed, embedding rows."""
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in (start, end)],
                         special_tokens=True)
    start_id, end_id = tokenizer.convert_tokens_to_ids([start, end])
    embeddings = lm.get_input_embeddings()
    if max(start_id, end_id) >= embeddings.weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = lm.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[[start_id, end_id]] = initial.to(embeddings.weight.dtype)
    return start_id, end_id


def _load_module_checkpoint(model, path: str) -> None:
    """Load the ``model.*`` weights of a Lightning checkpoint of a :class:`CausalLMModule` into ``model``."""
    check_checkpoint_file(path, "QuietSTaRModule.init_checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    restore_4bit_quant_states(model, weights)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [key for key in missing if "lora_" not in key]:
        raise ValueError(f"QuietSTaRModule.init_checkpoint: {path} does not match the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
