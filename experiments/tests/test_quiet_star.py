"""The difficult-token sets of the Quiet-STaR evidence part (experiments/protocols/quiet_star.py)."""

import random

import pytest

from experiments.protocols.quiet_star import answer_digit_positions, mean_over, passes_per_step, top_fraction


def naive_top(losses, candidates, fraction):
    """Every (loss, doc, position) sorted by loss descending, ties by doc then position; the first share kept."""
    items = [(-losses[d][p], d, p) for d, positions in enumerate(candidates) for p in positions]
    kept = sorted(items)[: round(fraction * len(items))]
    return [sorted(p for _, d, p in kept if d == doc) for doc in range(len(candidates))]


@pytest.mark.parametrize("seed", range(5))
def test_top_fraction_matches_a_naive_sort(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(2, 40) for _ in range(7)]
    # Rounded losses: many ties, which must go to the earlier document, then the earlier position.
    losses = [[round(rng.random() * 5, 1) for _ in range(n)] for n in lengths]
    candidates = [sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) for n in lengths]
    for fraction in (0.0, 0.1, 0.37, 1.0):
        chosen = top_fraction(losses, candidates, fraction)
        assert chosen == naive_top(losses, candidates, fraction)
        assert sum(map(len, chosen)) == round(fraction * sum(map(len, candidates)))


def test_top_decile_mean_is_the_mean_of_the_largest_losses():
    losses = [[0.0, 9.0, 1.0, 2.0, 3.0], [0.0, 4.0, 5.0, 6.0, 7.0, 8.0]]
    every = [list(range(1, len(row))) for row in losses]  # 9 targets (position 0 never is one)
    chosen = top_fraction(losses, every, 0.34)  # round(3.06) = 3 largest: 9, 8, 7
    assert chosen == [[1], [4, 5]]
    assert mean_over(losses, chosen) == pytest.approx((9 + 8 + 7) / 3)
    assert mean_over(losses, [[], []]) != mean_over(losses, [[], []])  # NaN when nothing is chosen


def test_answer_digits_are_the_final_answers_digits():
    from lightning_tokens.data.tokenizer import load_task_tokenizer

    tokenizer = load_task_tokenizer()
    for answer in ("85", "-3", "11478", "0"):
        text = f"Compute 7 - 10.<think>\n7-10=-3\nthe answer is 12\n</think>\nThe answer is {answer}."
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        positions = answer_digit_positions(tokenizer, ids)
        assert "".join(tokenizer.decode([ids[p]]).strip() for p in positions) == answer.lstrip("-")
        assert positions == list(range(positions[0], positions[0] + len(positions)))
    assert answer_digit_positions(tokenizer, tokenizer("no answer here")["input_ids"]) == []


def test_equal_compute_ratio_is_the_pass_count():
    # The paper's settings: the text pass, then per thought 10 passes reading <sot> and the 9 thought tokens,
    # 1 reading <eot> and 3 reading true tokens: 1 + 2 * 14 = 29.
    assert passes_per_step(dict(n_thoughts=2, thought_length=9, n_ahead_talk=4)) == 29
