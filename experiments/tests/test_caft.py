"""The CAFT evidence protocol (experiments/protocols/caft.py): the style detector and the seed-spread rule.

The style detector is checked against the task's own renderings (every problem of every style), the paired
comparison against scipy's paired t-test.
"""

import math

import pytest

from experiments.protocols.caft import in_words, paired, table
from lightning_tokens import ReasoningTask


@pytest.mark.parametrize("preset", ["easy", "medium"])
def test_in_words_tells_the_words_style_from_the_base_styles(preset):
    for style in ("concise", "verbose", "words"):
        records = ReasoningTask.preset(preset, style=style, num_train=200, num_val=1, seed=900).records("train")
        assert all(in_words(r["completion"]) == (style == "words") for r in records), style


def test_in_words_needs_a_thinking_block():
    assert not in_words("7 plus 8 is 15\nThe answer is 15.")
    assert not in_words("<think>\n7 plus 8 is 15\nThe answer is 15.")
    assert in_words("<think>\n7 plus 8 is 15\n</think>\nThe answer is 15.")


def test_paired_matches_scipy_and_calls_the_spread():
    stats = pytest.importorskip("scipy.stats")
    caft, ntp = [0.31, 0.35, 0.29, 0.40, 0.33], [0.30, 0.36, 0.25, 0.37, 0.33]
    result = paired(caft, ntp)
    reference = stats.ttest_rel(caft, ntp)
    assert math.isclose(result["t"], reference.statistic, rel_tol=1e-9)
    assert math.isclose(result["mean"], sum(c - n for c, n in zip(caft, ntp)) / 5, rel_tol=1e-9)
    assert result["inside"] == (reference.pvalue >= 0.05)
    gain = [n + 0.05 + 0.001 * i for i, n in enumerate(ntp)]  # a steady gain: outside the spread
    assert not paired(gain, ntp)["inside"] and stats.ttest_rel(gain, ntp).pvalue < 0.05
    assert paired([0.2, 0.2], [0.2, 0.2])["inside"]
    with pytest.raises(ValueError):
        paired([0.1], [0.2])


def test_table_rows_and_paired_line():
    rows = [dict(method="base", seed=0, steps=0, exact_match=0.3, in_words=0.0, val_loss=8.0)]
    for seed, (c, n) in enumerate([(0.3, 0.2), (0.4, 0.3), (0.2, 0.2)]):
        rows += [dict(method="caft", seed=seed, steps=10, exact_match=c, in_words=1.0, val_loss=0.3),
                 dict(method="ntp", seed=seed, steps=10, exact_match=n, in_words=1.0, val_loss=0.3)]
    text = table(rows)
    assert "| CAFT | 30.0 ± 10.0 | 30.0, 40.0, 20.0 |" in text
    assert "| next-token | 23.3 ± 5.8 |" in text
    assert "exact_match: +6.7 ± 5.8 points over 3 seeds" in text
