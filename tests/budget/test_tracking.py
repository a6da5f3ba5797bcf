"""Per-row thinking state during generate (budget/tracking.py): the step-by-step tracker against a from-scratch count
of every sequence, and the budget arguments' checks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_tokens.budget.tracking import ThinkingTracker, budget_list, per_row

START, END = 1, 2


def naive_state(row, prompt_length, start_id):
    """(thinking, tokens thought): counted after the prompt's last ``<think>`` (else the first generated one; with
    no start token, after the prompt), stopping at the first ``</think>``; later ``<think>`` tokens count as
    thinking tokens and reopen nothing."""
    if start_id is None:
        start = prompt_length - 1
    else:
        in_prompt = [i for i in range(prompt_length) if row[i] == start_id]
        generated = [i for i in range(prompt_length, len(row)) if row[i] == start_id]
        if not in_prompt and not generated:
            return False, 0
        start = in_prompt[-1] if in_prompt else generated[0]
    after = row[start + 1:]
    if END in after:
        return False, after.index(END)
    return True, len(after)


def sequences(seed, rows=8, prompt_length=5, steps=9):
    """Prompts with and without ``<think>`` (some closed), then generated tokens: a row whose prompt has no
    ``<think>`` opens one; ``</think>`` comes at random; a ``<think>`` comes after a closed span, and while
    thinking (neither restarts the count)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 10, (rows, prompt_length + steps), generator=g)
    ids[0, 2] = START  # thinking from the prompt
    ids[1, 1], ids[1, 3] = START, END  # closed in the prompt
    ids[2, 4] = START  # opened by the last prompt token
    for row, step in zip(range(3, rows), (0, 3, 6)):  # opened while generating
        ids[row, prompt_length + step] = START
    closing = torch.rand(rows, prompt_length + steps, generator=g) < 0.15
    closing[:, :prompt_length] = False
    ids[closing & (ids != START)] = END
    ids[6, 1], ids[6, prompt_length + 2], ids[6, prompt_length + 4] = START, END, START  # <think> after </think>
    ids[6, prompt_length + 5:] = 5
    ids[7, 0], ids[7, prompt_length + 1], ids[7, prompt_length + 5] = START, START, START  # <think> while thinking
    ids[7, 1:prompt_length] = 5
    ids[7, prompt_length + 2:prompt_length + 5] = 5
    ids[7, prompt_length + 6:] = 5
    return ids, prompt_length


@pytest.mark.parametrize("start_id", [START, None])
def test_the_step_by_step_state_equals_a_count_from_scratch(start_id):
    tracker = ThinkingTracker(start_id, END)
    for seed in (0, 1):  # the second generate() call is recognised as new and its prompt scanned
        ids, prompt_length = sequences(seed)
        for length in range(prompt_length, ids.shape[1] + 1):
            tracker.update(ids[:, :length])
            for row in range(ids.shape[0]):
                thinking, count = naive_state(ids[row, :length].tolist(), prompt_length, start_id)
                assert tracker.thinking(row) == thinking, (seed, length, row)
                if thinking:
                    assert tracker.t[row] == count, (seed, length, row)
        assert tracker.steps == ids.shape[1] - prompt_length


def test_reset_rescans_the_same_prompt():
    ids, prompt_length = sequences(0)
    tracker = ThinkingTracker(START, END)
    tracker.update(ids[:, :prompt_length])
    tracker.update(ids[:, :prompt_length + 1])
    tracker.reset()
    tracker.update(ids[:, :prompt_length + 1])  # would read as the same generation without the reset
    assert tracker.steps == 0
    assert tracker.t[0] == naive_state(ids[0, :prompt_length + 1].tolist(), prompt_length, START)[1]


def test_budgets_become_floats_one_per_row():
    assert budget_list(7, "X.budgets") == [7.0]
    assert budget_list([3, 4.5], "X.budgets") == [3.0, 4.5]
    assert budget_list(torch.tensor([[2], [9]]), "X.budgets") == [2.0, 9.0]
    assert per_row([5.0], 3, "X.budgets") == [5.0, 5.0, 5.0]
    assert per_row([1.0, 2.0], 2, "X.budgets") == [1.0, 2.0]


@pytest.mark.parametrize("bad", [0, -1, [4, 0], math.nan, math.inf, []])
def test_a_bad_budget_is_one_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="X.budgets"):
        budget_list(bad, "X.budgets")


def test_a_budget_count_other_than_one_or_the_batch_size_is_refused():
    with pytest.raises(ValueError, match="X.budgets has 2 entries but the batch has 3 rows"):
        per_row([1.0, 2.0], 3, "X.budgets")
