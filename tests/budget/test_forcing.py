"""Budget forcing (budget/forcing.py): thinking is closed at the budget, followed by the answer cue."""

from __future__ import annotations

from lightning_tokens.budget import BudgetForcing
from tests.budget.helpers import ids


def test_budget_forcing_closes_thinking_at_the_budget_with_the_cue(lm):
    model, tokenizer = lm
    S, E = ids(tokenizer, "<think>", "</think>")
    cue = tokenizer("\nThe answer is", add_special_tokens=False)["input_ids"]
    enc = tokenizer(["Compute 1 + 2.<think>", "Compute 12 + 30 - 4.<think>\n"], return_tensors="pt", padding=True)
    budgets = [3, 6]
    forcing = BudgetForcing(tokenizer, budgets, answer_cue="\nThe answer is")
    out = model.generate(**enc, logits_processor=[forcing], max_new_tokens=14, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    for row, budget in enumerate(budgets):
        full = out[row].tolist()
        start = max(i for i, tok in enumerate(full) if tok == S)
        thought = full[start + 1:]
        end = thought.index(E) if E in thought[:budget] else budget
        assert end <= budget
        if end == budget:  # forced: </think> right at the budget, then the cue
            assert thought[budget] == E and thought[budget + 1: budget + 1 + len(cue)] == cue
    assert forcing.forced_rows >= 1  # the untrained model does not close thinking by itself
