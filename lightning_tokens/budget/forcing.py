"""Budget forcing (s1's baseline): when a row has thought for its budget, force ``</think>`` (and an
optional answer cue), then let the model answer freely."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase
from typing_extensions import override

from lightning_tokens.budget.data import think_token_id
from lightning_tokens.budget.tracking import ThinkingTracker, budget_list, per_row
from lightning_tokens.reasoning import THINK_END, THINK_START


class BudgetForcing(LogitsProcessor):
    """A ``LogitsProcessor`` that ends thinking at the budget: once a row has generated ``B`` thinking tokens
    after ``<think>``, its next token is ``</think>``, then the tokens of ``answer_cue`` one per step.

    Rows that close thinking on their own are never touched. Pass it in ``logits_processor=[...]`` (it
    sets every other score to ``-inf``, so it wins over later warpers and sampling).

    Args:
        tokenizer: The LM's tokenizer.
        budgets: Thinking budget in tokens, one number or one per row.
        think_start: Marker opening thinking, or ``None`` when the prompt already thinks. Default ``"<think>"``.
        think_end: Marker closing thinking. Default ``"</think>"``.
        answer_cue: Text forced right after ``</think>`` (e.g. ``"\\nThe answer is"``; s1 uses
            ``"Final Answer:"``). Default ``None``: nothing.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, budgets: int | float | Sequence[int] | torch.Tensor,
                 think_start: Optional[str] = THINK_START, think_end: str = THINK_END,
                 answer_cue: Optional[str] = None) -> None:
        self.budgets = budget_list(budgets, "BudgetForcing.budgets")
        start = think_token_id(tokenizer, think_start, "think_start") if think_start else None
        self.end_id = think_token_id(tokenizer, think_end, "think_end")
        self.tracker = ThinkingTracker(start, self.end_id)
        self.cue = tokenizer(answer_cue, add_special_tokens=False)["input_ids"] if answer_cue else []
        self.forced: list[int] = []  # per row: -1 free, k >= 0 the next cue token to force
        self.forced_rows = 0  # rows whose thinking was cut, over all calls

    def reset(self) -> None:
        """Start afresh for a new ``generate()`` call (also detected automatically)."""
        self.tracker.reset()

    @override
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        budgets = per_row(self.budgets, input_ids.shape[0], "BudgetForcing.budgets")
        tracker = self.tracker
        tracker.update(input_ids)
        if tracker.steps == 0:
            self.forced = [-1] * input_ids.shape[0]
        targets: dict[int, int] = {}
        for row, position in enumerate(self.forced):
            if position >= 0:  # continue the answer cue
                targets[row] = self.cue[position]
                self.forced[row] = position + 1 if position + 1 < len(self.cue) else -1
            elif tracker.thinking(row) and tracker.t[row] >= budgets[row]:
                targets[row] = self.end_id
                self.forced[row] = 0 if self.cue else -1
                self.forced_rows += 1
        if not targets:
            return scores
        scores = scores.clone()
        rows = torch.tensor(list(targets), device=scores.device)
        scores[rows] = float("-inf")
        scores[rows, torch.tensor(list(targets.values()), device=scores.device)] = 0.0
        return scores
