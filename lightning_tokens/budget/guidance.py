"""Budget guidance at decoding time: reweight the next-token distribution by each candidate's chance of
finishing its thinking within the remaining budget.

With budget ``B`` and ``t`` thinking tokens generated, ``B_rem = max(B - t, 1)`` and for each candidate
``v``: ``w_v = GammaCDF(log(B_rem + 1); alpha_v, lambda_v)``, ``p'(v) ∝ p(v) w_v``.
"""

from __future__ import annotations

import warnings
from typing import Literal, Optional, Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, PreTrainedTokenizerBase
from typing_extensions import override

from lightning_tokens.budget.capture import HiddenStateCapture
from lightning_tokens.budget.data import think_token_id
from lightning_tokens.budget.gamma import decoded_mode, encode_length, gamma_cdf
from lightning_tokens.budget.predictor import BudgetPredictor
from lightning_tokens.budget.tracking import ThinkingTracker, budget_list, per_row
from lightning_tokens.checks import check_numbers
from lightning_tokens.modeling import inference_kwargs
from lightning_tokens.reasoning import THINK_END, THINK_START


def newline_mask(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """``(V,)`` bool: the tokens whose text contains a newline (step boundaries)."""
    texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))])
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[: len(texts)] = torch.tensor(["\n" in text for text in texts])
    return mask


def guidance_weights(alpha: torch.Tensor, rate: torch.Tensor, remaining_budget: torch.Tensor, min_rate: float = 10.0,
                     min_shape: float = 1.0, min_mode: float = 0.9) -> torch.Tensor:
    """``w = GammaCDF(log(B_rem + 1); alpha, rate)``, 0 for rows that fail the trained-row checks.

    Args:
        alpha: ``(R, K)`` shapes.
        rate: ``(R, K)`` rates.
        remaining_budget: ``(R,)`` ``B_rem``.
        min_rate: Keep a candidate only when ``rate >= min_rate``. Default ``10`` (reference).
        min_shape: ... and ``alpha > min_shape``. Default ``1`` (reference).
        min_mode: ... and its decoded mode ``exp((alpha - 1) / rate) - 1 >= min_mode``. Default ``0.9`` (reference).
    """
    y = encode_length(remaining_budget)[:, None]
    valid = (rate >= min_rate) & (alpha > min_shape) & (decoded_mode(alpha, rate) >= min_mode)
    # gammainc(a, 0) returns at once (a real saving on the CPU, where masked candidates are often most of
    # them); the outer where keeps them at 0 even where gammainc(0, 0) is NaN.
    w = gamma_cdf(alpha, rate, torch.where(valid, y, 0.0))
    return torch.where(valid, w, 0.0)


class BudgetGuidanceLogitsProcessor(LogitsProcessor):
    """Steer thinking length in ``model.generate()`` with a trained :class:`BudgetPredictor`.

    Hooks on ``model`` read every layer's hidden state at the last position of each forward (no
    ``output_hidden_states``); at a guided step the processor turns the scores of a thinking row into
    ``log(p * w / sum(p * w))``, where ``w`` is :func:`guidance_weights` with ``B_rem = max(B - t, 1)`` and
    ``t`` the thinking tokens generated after the row's ``<think>``. If every ``w`` of a row is 0 the
    row's argmax token is taken (the reference's fallback): that row is not guided at that step. The processor
    counts those row-steps (:attr:`fallback_share`) and, when it is taken off the model (:meth:`remove`, or the
    end of the ``with`` block), warns if more than half of the guided row-steps fell back: the trained-row
    thresholds then mask the predictor's rows, and guidance is mostly plain decoding (see
    :func:`~lightning_tokens.budget.calibrate_thresholds`). Rows outside thinking (before ``<think>``,
    after ``</think>``) are left untouched. Nothing is forced when a budget runs out (see :class:`BudgetForcing`).

    Order: ``generate()`` runs its own processors (repetition penalty, min length, bad words...) first, then
    the ``logits_processor`` list in order, then the sampling warpers (temperature, top-k, top-p). Guidance
    therefore acts on the processed distribution and sampling warpers act on the guided one (the reference
    bypasses every other processor at guided steps). Greedy and sampling decoding are supported; beam search
    is not (it reorders rows).

    Use it as a context manager, or call :meth:`remove` to take the hooks off::

        with BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, budgets=[64, 256]) as guide:
            out = model.generate(input_ids, attention_mask=mask, logits_processor=[guide])

    A mixture-of-experts model whose config sets ``output_router_logits`` needs ``output_router_logits=False`` in
    that call (``**inference_kwargs(model)``, from :mod:`lightning_tokens.modeling`): transformers' ``generate``
    fails on a padded batch otherwise.

    Args:
        model: The causal LM that generates (any wrapper; quantized is fine).
        predictor: The trained predictor for that LM.
        tokenizer: Its tokenizer (think markers, newline tokens).
        budgets: Thinking budget in tokens: one number for all rows or one per row (``B`` in the paper).
        think_start: Marker opening thinking, or ``None`` when the prompt already thinks. Default ``"<think>"``.
        think_end: Marker closing thinking. Default ``"</think>"``.
        steps: ``"newline"``: guide at the first thinking token and after any token containing a newline
            (the reference's step boundaries); ``"every"``: at every thinking token. Default ``"newline"``.
        top_k: Score only the ``k`` most probable candidates and drop the rest (cheaper with a large
            vocabulary). Default ``None``: every token, as the reference.
        min_rate: Threshold on ``lambda_v``. Default ``10.0`` (reference).
        min_shape: Threshold on ``alpha_v``. Default ``1.0`` (reference).
        min_mode: Threshold on the decoded mode. Default ``0.9`` (reference).
    """

    def __init__(self, model: nn.Module, predictor: BudgetPredictor, tokenizer: PreTrainedTokenizerBase,
                 budgets: int | float | Sequence[int] | torch.Tensor, think_start: Optional[str] = THINK_START,
                 think_end: str = THINK_END, steps: Literal["newline", "every"] = "newline",
                 top_k: Optional[int] = None, min_rate: float = 10.0, min_shape: float = 1.0,
                 min_mode: float = 0.9) -> None:
        if steps not in ("newline", "every"):
            raise ValueError(f"BudgetGuidanceLogitsProcessor.steps must be 'newline' or 'every', got {steps!r}")
        check_numbers("BudgetGuidanceLogitsProcessor", top_k=(top_k, "an integer >= 1 or None"),
                      min_rate=(min_rate, "a number"), min_shape=(min_shape, "a number"),
                      min_mode=(min_mode, "a number"))
        self.budgets = budget_list(budgets, "BudgetGuidanceLogitsProcessor.budgets")
        self.predictor = predictor.eval()
        self.steps, self.top_k = steps, top_k
        self.min_rate, self.min_shape, self.min_mode = min_rate, min_shape, min_mode
        start = think_token_id(tokenizer, think_start, "think_start") if think_start else None
        self.tracker = ThinkingTracker(start, think_token_id(tokenizer, think_end, "think_end"))
        vocab = predictor.config.vocab_size
        self.newline = newline_mask(tokenizer, vocab).tolist() if steps == "newline" else None
        self.capture = HiddenStateCapture(model, last_only=True)
        self.guided_steps = 0
        self.guided_row_steps = 0
        self._fallbacks: Optional[torch.Tensor] = None  # on the device: read only when asked, no sync per step
        self._removed = False

    # -- lifecycle -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start afresh for a new ``generate()`` call (also detected automatically)."""
        self.tracker.reset()

    def remove(self) -> None:
        """Take the hooks off the model; warn if most guided row-steps fell back to the argmax token.

        Only the first call acts, so ``remove()`` inside a ``with`` block does not warn a second time on exit.
        """
        if self._removed:
            return
        self._removed = True
        self.capture.remove()
        share = self.fallback_share
        if share > 0.5:
            warnings.warn(
                f"BudgetGuidanceLogitsProcessor: at {share:.0%} of {self.guided_row_steps} guided row-steps every "
                f"candidate failed the trained-row check (min_rate={self.min_rate}, min_shape={self.min_shape}, "
                f"min_mode={self.min_mode}), so those steps decoded the argmax token unguided. Lower the thresholds "
                "(lightning_tokens.budget.calibrate_thresholds reads them off held-out predictions) or pass "
                "min_rate=0, min_shape=0, min_mode=-1 to guide every row.", stacklevel=2)

    @property
    def fallback_share(self) -> float:
        """Share of guided row-steps so far where no candidate passed the thresholds (argmax taken); 0 before any."""
        if not self.guided_row_steps:
            return 0.0
        return float(self._fallbacks) / self.guided_row_steps

    def __enter__(self) -> "BudgetGuidanceLogitsProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- decoding --------------------------------------------------------------------------------------
    def guided_rows(self) -> list[int]:
        """Rows guided at this step (after the tracker has read the step's sequences)."""
        tracker = self.tracker
        if self.steps == "every" or tracker.steps == 0:
            return [row for row in range(len(tracker.t)) if tracker.thinking(row)]
        newline, last = self.newline, tracker.last
        return [row for row in range(len(tracker.t)) if tracker.thinking(row)
                and (tracker.t[row] == 0 or (last[row] < len(newline) and newline[last[row]]))]

    @override
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        budgets = per_row(self.budgets, input_ids.shape[0], "BudgetGuidanceLogitsProcessor.budgets")
        self.tracker.update(input_ids)
        rows = self.guided_rows()
        if not rows:  # most steps with newline guidance: no device work at all
            return scores
        self.guided_steps += 1
        self.guided_row_steps += len(rows)
        return self._guide(scores, rows, [max(budgets[row] - self.tracker.t[row], 1.0) for row in rows])

    @torch.no_grad()
    def _guide(self, scores: torch.Tensor, rows: list[int], remaining: list[float]) -> torch.Tensor:
        """``scores`` with the rows ``rows`` (``B_rem`` of each in ``remaining``) replaced by guided log-probs."""
        if len(rows) == scores.shape[0]:
            return self._guided_log_probs(scores, self.capture.last_states(), remaining).to(scores.dtype)
        index = torch.tensor(rows, device=scores.device)
        guided = self._guided_log_probs(scores.index_select(0, index), self.capture.last_states(index), remaining)
        return scores.index_copy(0, index, guided.to(scores.dtype))

    def _guided_log_probs(self, scores: torch.Tensor, states: torch.Tensor, remaining: list[float]) -> torch.Tensor:
        """Guided log-probabilities ``log(p * w / sum(p * w))`` (fp32) of the rows to guide.

        Args:
            scores: ``(R, V)`` scores of those rows.
            states: ``(R, N + 1, H)`` their hidden states at the last position.
            remaining: ``B_rem`` of each row.
        """
        log_p = torch.log_softmax(scores.float(), dim=-1)
        # Inference mode dispatches the predictor's many small ops faster than no_grad. Its tensors are only
        # read outside it, so what goes back to generate() is an ordinary tensor.
        with torch.inference_mode():
            w = self._weights(log_p, states, torch.tensor(remaining, device=scores.device))
        guided, fell_back = _renormalise(log_p + torch.log(w), log_p)
        self._fallbacks = fell_back if self._fallbacks is None else self._fallbacks + fell_back
        return guided

    def _weights(self, log_p: torch.Tensor, states: torch.Tensor, remaining_budget: torch.Tensor) -> torch.Tensor:
        """``(R, V)`` :func:`guidance_weights` (0 outside the ``top_k`` candidates when ``top_k`` is set)."""
        features = self.predictor.features(states)
        thresholds = (self.min_rate, self.min_shape, self.min_mode)
        if self.top_k is None:
            return guidance_weights(*self.predictor.gamma(features), remaining_budget, *thresholds)
        candidates = log_p.topk(min(self.top_k, log_p.shape[-1]), dim=-1).indices
        w_top = guidance_weights(*self.predictor.gamma(features, candidates), remaining_budget, *thresholds)
        return torch.zeros_like(log_p).scatter_(1, candidates, w_top)


def _renormalise(guided: torch.Tensor, log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of ``guided = log(p * w)`` per row; a row with no finite entry becomes its argmax token.
    Also returns how many rows fell back (a 0-d tensor on the device).

    No trusted candidate left (every ``w`` is 0, or only tokens an earlier processor banned have ``w > 0``):
    the reference falls back to the argmax token. The fallback is computed for every row and picked with a
    ``where``, which costs a few small ops but no device synchronisation.

    Args:
        guided: ``(R, V)`` ``log p + log w``.
        log_p: ``(R, V)`` ``log p`` (its argmax is the fallback).
    """
    trusted = guided.amax(-1, keepdim=True) > float("-inf")
    fallback = torch.full_like(log_p, float("-inf")).scatter_(1, log_p.argmax(-1, keepdim=True), 0.0)
    return torch.where(trusted, torch.log_softmax(guided, dim=-1), fallback), (~trusted).sum()


@torch.no_grad()
def estimate_thinking_length(model: nn.Module, predictor: BudgetPredictor, input_ids: torch.Tensor,
                             attention_mask: Optional[torch.Tensor] = None, top_k: int = 10) -> torch.Tensor:
    """Predicted thinking length (tokens between ``<think>`` and ``</think>``) before generating: a difficulty estimate.

    The prompts must end where thinking starts (with ``<think>``, or its chat-template equivalent). At
    the last position the predictor's decoded mode ``exp((alpha_v - 1) / lambda_v) - 1`` for each of the
    ``top_k`` most probable first thinking tokens ``v`` is averaged with the LM's renormalised
    probabilities; the candidate itself counts as one token of ``L``, so the estimate is that minus 1.

    Args:
        model: The causal LM.
        predictor: Its trained predictor.
        input_ids: ``(B, T)`` left-padded prompts.
        attention_mask: ``(B, T)`` mask. Default ``None``: all ones.
        top_k: Candidates averaged. Default ``10``.

    Returns:
        ``(B,)`` float tensor of predicted thinking lengths.
    """
    check_numbers("estimate_thinking_length", top_k=(top_k, "an integer >= 1"))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    predictor = predictor.eval()
    with HiddenStateCapture(model, last_only=True) as capture:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                       **inference_kwargs(model)).logits[:, -1]
        states = capture.states
    probs, candidates = torch.softmax(logits.float(), -1).topk(min(top_k, logits.shape[-1]), dim=-1)
    alpha, rate = predictor(states, candidates)
    mode = decoded_mode(alpha, rate)
    return ((probs * mode).sum(-1) / probs.sum(-1) - 1).clamp_min(0.0)
