"""Per-token cross-entropy of a causal LM from its final hidden state, never its ``(B, T, V)`` logits.

A training forward of a transformers causal LM normally projects every position onto the vocabulary and
keeps those logits (and a float32 copy of them) until backward: at a vocabulary of 150k they are most of
the step's memory. Here the model runs with its output head applied to no position at all (a pre-hook on
the head captures the head's input, the final hidden state, and hands the head an empty slice of it), and
the cross-entropy is computed afterwards from that hidden state for the target positions only, a chunk of
rows at a time, so a chunk's ``(chunk, V)`` logits exist only while it is computed. For a plain linear head a
custom autograd function does the work: it takes each chunk's ``d loss / d hidden`` in forward and
recomputes the chunk in backward only for the head's weight gradient; when the per-row weights are known
before the call (the plain mean, CAFT's heads, a contract whose handlers only reweight) it finishes every
gradient in forward. Any other head (LoRA-wrapped, quantized) runs each chunk under activation
checkpointing. The log-sum-exp is float32.

One helper serves every place that needs per-token losses: the loss contract
(:mod:`lightning_tokens.token_loss`), plain SFT in :class:`~lightning_tokens.CausalLMModule`, ssToken's
history and Rho-1's reference forwards, and CAFT's heads (:func:`chunked_cross_entropy`).

Logit post-processing that some families apply after the head (Gemma 2/3 soft-capping, Cohere's
``logit_scale``, Granite's ``logits_scaling``) is reproduced by :class:`OutputProjection`. Any other
post-processing is caught on a model's first lean forward: the head then also projects the last position,
and a mismatch against the reproduction raises :class:`UnsupportedLogits`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_tokens.modeling import causal_lm_of

IGNORE_INDEX = -100
#: Target rows projected onto the vocabulary at once (1,024 rows x 151,936 entries = 0.6 GB of float32 logits).
DEFAULT_CHUNK = 1024

#: Models already checked against their own logits (see :meth:`OutputProjection.check`).
_checked: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def is_checked(model: nn.Module) -> bool:
    """Whether ``model``'s logits were already compared with their reproduction (:meth:`OutputProjection.check`)."""
    return causal_lm_of(model) in _checked


class UnsupportedLogits(ValueError):
    """A model post-processes its logits in a way :class:`OutputProjection` does not reproduce."""


class LogitPost:
    """The elementwise post-processing of logits some families apply after the head: ``cap * tanh(s * z / cap)``.

    Args:
        scale: ``s`` (Cohere's ``logit_scale``, or one over Granite's ``logits_scaling``). Default ``1.0``.
        softcap: ``cap`` (Gemma's ``final_logit_softcapping``), or ``None`` for none. Default ``None``.
    """

    def __init__(self, scale: float = 1.0, softcap: Optional[float] = None) -> None:
        self.scale, self.softcap = float(scale), softcap

    def apply(self, z: Tensor) -> tuple[Tensor, Optional[Tensor | float]]:
        """``(logits, d logits / d z)``; the slope is ``None`` for the identity."""
        x = z * self.scale if self.scale != 1.0 else z
        if self.softcap is None:
            return x, (self.scale if self.scale != 1.0 else None)
        t = torch.tanh(x / self.softcap)
        return t * self.softcap, (1 - t * t) * self.scale


class OutputProjection:
    """Hidden states to logits exactly as the model's forward computes them: output head, then post-processing.

    Args:
        model: The causal LM (a PEFT wrapper is looked through).
        head: The output layer to apply. Default ``None``: the model's own (``get_output_embeddings()``); CAFT
            heads with their own unembedding pass theirs.
    """

    def __init__(self, model: nn.Module, head: Optional[nn.Module] = None) -> None:
        lm = causal_lm_of(model)
        self.model = lm
        self.head = head if head is not None else lm.get_output_embeddings()
        if self.head is None:
            raise UnsupportedLogits(f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None)")
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        scale = getattr(config, "logit_scale", None) or 1.0  # Cohere: logits * logit_scale
        divisor = getattr(config, "logits_scaling", None) or 1.0  # Granite: logits / logits_scaling
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
        self.post = LogitPost(scale / divisor, softcap)

    def __call__(self, hidden: Tensor) -> Tensor:
        """Float32 logits of ``hidden`` (``(..., D)``, the head's input)."""
        return self.post.apply(self.head(hidden).float())[0]

    def check(self, hidden: Tensor, logits: Tensor) -> None:
        """Compare the model's own ``logits`` of the rows ``hidden`` against this reproduction, once per model.

        Raises:
            UnsupportedLogits: They differ by more than rounding.
        """
        if self.model in _checked:
            return
        with torch.no_grad():
            ours, theirs = self(hidden.detach()), logits.detach().float()
            gap = (ours - theirs).abs().max().item()
            eps = torch.finfo(logits.dtype).eps if logits.is_floating_point() else 1e-6
            tolerance = 16 * eps * (theirs.abs().max().item() + 1.0)
        if gap > tolerance:
            raise UnsupportedLogits(
                f"{type(self.model).__name__} post-processes its logits after the output head in a way the lean loss "
                f"does not reproduce (largest difference {gap:.3g} on the last position): pass keep_logits=True to "
                "compute the loss from the model's full logits")
        _checked.add(self.model)


class HeadInputCapture:
    """Capture the input of a model's output head during one forward and keep the head from projecting it.

    While started, the first call of the head records its input (the final hidden state, ``(B, T, D)``) and the
    head runs on ``keep`` positions of it instead: none (``(B, 0, V)`` logits) or the last few, for
    :meth:`OutputProjection.check` (and the dispatcher's check of a model's own loss).
    """

    def __init__(self, model: nn.Module) -> None:
        self.head = causal_lm_of(model).get_output_embeddings()
        self.hidden: Optional[Tensor] = None
        self._hook: Any = None

    def start(self, keep_last: bool | int = False) -> None:
        """Capture the next call of the head, which then projects the last ``int(keep_last)`` positions only."""
        keep = int(keep_last)
        self.stop()  # a forward that raised may have left its hook behind

        def trim(module: nn.Module, args: tuple) -> Optional[tuple]:
            if self.hidden is not None or not args:
                return None
            self.hidden = args[0]
            kept = args[0][..., -keep:, :] if keep else args[0][..., :0, :]
            return (kept, *args[1:])

        self._hook = self.head.register_forward_pre_hook(trim)

    @property
    def active(self) -> bool:
        return self._hook is not None

    def stop(self) -> Optional[Tensor]:
        """Remove the hook; the captured hidden state, or ``None`` if the head was not called."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        hidden, self.hidden = self.hidden, None
        return hidden


def _rows_ce(project: Callable[[Tensor], Tensor], rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = project(rows).float()
    loss = F.cross_entropy(logits, targets, reduction="none")
    hits = logits.detach().argmax(-1) == targets
    return loss, hits


def _logit_grad(logits: Tensor, lse: Tensor, targets: Tensor, slope: Optional[Tensor | float],
                row_scale: Optional[Tensor] = None) -> Tensor:
    """``d CE / d z`` of a chunk, ``(softmax - onehot) * slope * row_scale``, computed in place of ``logits``."""
    grad = logits.sub_(lse[:, None]).exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1
    if slope is not None:
        grad.mul_(slope)
    if row_scale is not None:
        grad.mul_(row_scale[:, None])
    return grad


class _LinearCrossEntropy(torch.autograd.Function):
    """Row cross-entropy of ``post(rows @ W.T + b)`` whose logits are never kept, for a plain linear head.

    Forward projects a chunk, takes its float32 log-sum-exp and, when ``rows`` needs a gradient, the chunk's
    ``d loss / d rows`` at once (one more matmul; scaled by the incoming gradient in backward). Backward
    recomputes a chunk's logits only for the weight's gradient, so a frozen head (LoRA) costs two matmuls in
    all, as a plain forward and backward does, and a trained one four.

    With ``scale`` (detached per-row weights known before the call) the output is the scalar
    ``sum(scale * loss)`` and every gradient is computed in forward: three matmuls, the weight's gradient
    held until backward.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, scale, post, chunk):
        need_rows = ctx.needs_input_grad[0]
        need_weight = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        early_weight = need_weight and scale is not None
        # Gradients accumulate over chunks in the weight's dtype, in place (no (V, D) temporary per chunk).
        weight_grad = torch.zeros_like(weight) if early_weight else None
        bias_grad = torch.zeros_like(bias, dtype=torch.float32) if early_weight and bias is not None else None
        losses, hits, row_grads = [], [], []
        for start in range(0, rows.shape[0], chunk):
            piece, goal = rows[start:start + chunk], targets[start:start + chunk]
            logits, slope = post.apply(F.linear(piece, weight, bias).float())
            lse = torch.logsumexp(logits, -1)
            losses.append(lse - logits.gather(-1, goal[:, None]).squeeze(-1))
            hits.append(logits.argmax(-1) == goal)
            if need_rows or early_weight:
                row_scale = scale[start:start + chunk] if scale is not None else None
                grad = _logit_grad(logits, lse, goal, slope, row_scale).to(weight.dtype)
                if need_rows:
                    row_grads.append(grad @ weight)
                if early_weight:
                    weight_grad.addmm_(grad.t(), piece)
                    if bias_grad is not None:
                        bias_grad.add_(grad.sum(0, dtype=torch.float32))
        loss = torch.cat(losses) if losses else rows.new_zeros(0, dtype=torch.float32)
        hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=rows.device)
        ctx.mark_non_differentiable(hit)
        ctx.post, ctx.chunk, ctx.scaled = post, chunk, scale is not None
        ctx.weight_grad, ctx.bias_grad = weight_grad, bias_grad
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        late_weight = need_weight and scale is None
        ctx.save_for_backward(torch.cat(row_grads) if row_grads else None,
                              *((rows, weight, bias, targets) if late_weight else (None,) * 4))
        if scale is not None:
            return (loss * scale).sum(), hit
        return loss, hit

    @staticmethod
    def backward(ctx, grad_loss, grad_hits):
        row_grad, rows, weight, bias, targets = ctx.saved_tensors
        rows_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_rows = grad_weight = grad_bias = None
        if ctx.scaled:
            if row_grad is not None:
                grad_rows = (row_grad * grad_loss).to(rows_dtype)
            if ctx.weight_grad is not None:
                grad_weight = (ctx.weight_grad * grad_loss).to(weight_dtype)
            if ctx.bias_grad is not None:
                grad_bias = (ctx.bias_grad * grad_loss).to(bias_dtype)
            return grad_rows, grad_weight, grad_bias, None, None, None, None
        if row_grad is not None:
            grad_rows = (row_grad * grad_loss[:, None]).to(rows_dtype)
        if weight is not None:
            grad_weight = torch.zeros_like(weight)
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
            for start in range(0, rows.shape[0], ctx.chunk):
                piece, goal = rows[start:start + ctx.chunk], targets[start:start + ctx.chunk]
                logits, slope = ctx.post.apply(F.linear(piece, weight, bias).float())
                grad = _logit_grad(logits, torch.logsumexp(logits, -1), goal, slope, grad_loss[start:start + ctx.chunk])
                grad = grad.to(weight.dtype)
                grad_weight.addmm_(grad.t(), piece)
                if grad_bias is not None:
                    grad_bias.add_(grad.sum(0, dtype=torch.float32))
            grad_bias = grad_bias.to(bias_dtype) if grad_bias is not None else None
        return grad_rows, grad_weight, grad_bias, None, None, None, None


def chunked_cross_entropy(project: Callable[[Tensor], Tensor], rows: Tensor, targets: Tensor,
                          chunk_size: int = DEFAULT_CHUNK, scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``project(rows)`` against ``targets`` per row, ``chunk_size`` rows at a time.

    An :class:`OutputProjection` whose head is a plain ``nn.Linear`` takes the fused path
    (:class:`_LinearCrossEntropy`); any other ``project`` (a LoRA-wrapped or quantized head, a callable) runs
    each chunk under activation checkpointing, so its logits are freed after the chunk and recomputed in
    backward.

    Args:
        project: Maps ``(N, D)`` rows to ``(N, V)`` logits.
        rows: ``(N, D)`` hidden states of the predicting positions.
        targets: ``(N,)`` target ids.
        chunk_size: Rows projected at once. Default ``DEFAULT_CHUNK`` (1,024).
        scale: ``(N,)`` detached weight of each row. Default ``None``: the per-row losses are returned; with it,
            their weighted sum (a scalar), which lets the fused path finish every gradient in forward.

    Returns:
        ``(loss, hits)``: ``(N,)`` float32 cross-entropy (or its weighted sum) and ``(N,)`` whether the top-1
        logit is the target.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    head = getattr(project, "head", None)
    if type(head) is nn.Linear and isinstance(project, OutputProjection):
        if scale is not None:
            scale = scale.detach().float()
        return _LinearCrossEntropy.apply(rows, head.weight, head.bias, targets, scale, project.post, chunk_size)
    parameters = list(head.parameters()) if isinstance(head, nn.Module) else []
    needs_graph = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in parameters))
    losses, hits = [], []
    for start in range(0, rows.shape[0], chunk_size):
        piece, goal = rows[start:start + chunk_size], targets[start:start + chunk_size]
        if needs_graph:
            loss, hit = checkpoint(_rows_ce, project, piece, goal, use_reentrant=False)
        else:
            loss, hit = _rows_ce(project, piece, goal)
        losses.append(loss)
        hits.append(hit)
    loss = torch.cat(losses) if losses else rows.new_zeros(0, dtype=torch.float32)
    hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=rows.device)
    return (loss * scale.detach().float()).sum() if scale is not None else loss, hit


def shifted_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, T - 1)`` next-token targets of unshifted ``labels`` and whether each is one (not ``-100``)."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def token_cross_entropy(projection: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor,
                        chunk_size: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy at every position and the target mask, both ``(B, T - 1)``, from hidden states.

    Only target positions are projected. Equal to ``per_token_loss(projection(hidden), labels)``.

    Args:
        projection: Hidden states to logits (an :class:`OutputProjection`).
        hidden: ``(B, T, D)`` input of the output head.
        labels: ``(B, T)`` unshifted labels, ``-100`` where not a target.
        chunk_size: Target rows projected at once. Default ``DEFAULT_CHUNK``.

    Returns:
        ``(token_loss, target_mask)``: float32 loss, 0 where not a target; bool mask.
    """
    targets, mask = shifted_targets(labels)
    losses, _ = chunked_cross_entropy(projection, hidden[:, :-1][mask], targets[mask], chunk_size)
    token_loss = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return token_loss.masked_scatter(mask, losses), mask


def lean_token_loss(model: nn.Module, kwargs: dict[str, Any], labels: Tensor,
                    chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Per-token loss ``(B, T - 1)`` of ``model(**kwargs)`` against ``labels`` without full logits.

    Used for forwards the caller runs itself (ssToken's history and Rho-1's reference models): gradients flow
    only if enabled by the caller.

    Args:
        model: A transformers causal LM (or PEFT wrapper).
        kwargs: Its inputs (no ``labels``).
        labels: ``(B, T)`` unshifted labels.
        chunk_size: Target rows projected at once. Default ``DEFAULT_CHUNK``.

    Raises:
        UnsupportedLogits: The model's logits are post-processed in a way that is not reproduced.
    """
    projection = OutputProjection(model)
    capture = HeadInputCapture(model)
    first = projection.model not in _checked
    capture.start(keep_last=first)
    try:
        output = model(**kwargs)
    finally:
        hidden = capture.stop()
    if hidden is None:
        raise UnsupportedLogits(f"{type(projection.model).__name__} never called its output head in forward")
    if first:
        projection.check(hidden[..., -1:, :], output.logits)
    return token_cross_entropy(projection, hidden, labels, chunk_size)[0]
