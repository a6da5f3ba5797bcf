"""Per-row thinking state during ``generate()``: inside ``<think>``? how many thinking tokens so far? done?

Shared by :class:`BudgetGuidanceLogitsProcessor` and :class:`BudgetForcing`. A logits processor sees the
whole sequence at every step; the tracker scans the prompt once, then reads the one new token of each
row per step. The state is a few Python numbers per row: one small device-to-host copy per step (the
step's last two tokens) and no other synchronisation.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def budget_list(budgets: int | float | Sequence[int] | torch.Tensor, name: str) -> list[float]:
    """Budgets as floats (a scalar or one per row); a clear error for a budget <= 0 or not finite."""
    values = torch.as_tensor(budgets, dtype=torch.float64).flatten().tolist()
    if not values:
        raise ValueError(f"{name}: budgets is empty")
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{name}: every budget must be a positive number of tokens, got {values}")
    return values


def per_row(budgets: list[float], batch: int, name: str) -> list[float]:
    """One budget per row: a single budget is shared; otherwise the count must equal the batch size."""
    if len(budgets) == 1:
        return budgets * batch
    if len(budgets) != batch:
        raise ValueError(f"{name} has {len(budgets)} entries but the batch has {batch} rows "
                         "(give one budget, or one per row)")
    return budgets


class ThinkingTracker:
    """Tracks each row's thinking span across the steps of one ``generate()`` call.

    ``t[row]`` counts the tokens after the prompt's last ``<think>`` (or, when the prompt has none, the first
    generated one), stopping at the first ``</think>`` after it. A ``<think>`` generated later neither restarts
    nor reopens the count, so a row never thinks past its budget twice. With ``start_id=None`` every row thinks
    from the first generated token. A new
    ``generate()`` call is recognised (the sequence is not the previous one plus a token) and its prompt
    scanned; :meth:`reset` forces that.

    Args:
        start_id: Id of ``<think>`` or ``None``.
        end_id: Id of ``</think>``.
    """

    def __init__(self, start_id: Optional[int], end_id: int) -> None:
        self.start_id, self.end_id = start_id, end_id
        self.reset()

    def reset(self) -> None:
        """Forget the current generation (the next call scans a new prompt)."""
        self.length = -1
        self.last: Optional[list[int]] = None
        self.steps = 0
        self.started: list[bool] = []
        self.ended: list[bool] = []
        self.t: list[int] = []

    def _scan(self, rows: list[list[int]]) -> None:
        self.started, self.ended, self.t = [], [], []
        for row in rows:
            if self.start_id is None:
                start = len(row) - 1
            else:
                starts = [i for i, token in enumerate(row) if token == self.start_id]
                start = starts[-1] if starts else None
            self.started.append(start is not None)
            self.ended.append(start is not None and self.end_id in row[start + 1:])
            self.t.append(len(row) - 1 - start if start is not None else 0)
        self.steps = 0

    def update(self, input_ids: torch.Tensor) -> None:
        """Read the sequences of the current step."""
        batch, length = input_ids.shape
        tail = input_ids[:, -2:].tolist()
        if (self.last is None or length != self.length + 1 or batch != len(self.last)
                or [row[0] for row in tail] != self.last):
            self._scan(input_ids.tolist())
        else:
            for row, (_, token) in enumerate(tail):
                if self.started[row] and not self.ended[row]:
                    if token == self.end_id:
                        self.ended[row] = True
                    else:
                        self.t[row] += 1
                elif not self.started[row] and token == self.start_id:
                    self.started[row], self.t[row] = True, 0
            self.steps += 1
        self.length, self.last = length, [row[-1] for row in tail]

    def thinking(self, row: int) -> bool:
        """Whether ``row`` is inside its thinking span."""
        return self.started[row] and not self.ended[row]
