"""Budget-guidance training data (budget/data.py): remaining-length targets against a naive count, cut and unfinished
traces, trace files."""

from __future__ import annotations

from lightning_tokens.budget import encode_traces, remaining_lengths
from lightning_tokens.data.records import Record
from tests.budget.helpers import ids


def naive_targets(seq, prompt_length, start_id, end_id):
    end = next(i for i in range(prompt_length, len(seq)) if seq[i] == end_id)
    starts = [i for i in range(end) if seq[i] == start_id]
    start = starts[-1] if starts else prompt_length - 1
    # hidden state at i sees candidate i + 1; thinking tokens left counting it: those in (i, end].
    return [sum(1 for j in range(i + 1, end + 1)) if start <= i < end else 0 for i in range(len(seq))]


def test_remaining_lengths_match_a_naive_count():
    S, E = 90, 91
    seq = [1, 5, 6, S, 10, 11, 12, 13, E, 20, 21]
    assert remaining_lengths(seq, 3, S, E) == naive_targets(seq, 3, S, E)
    assert remaining_lengths(seq, 3, S, E)[3] == 5 and remaining_lengths(seq, 3, S, E)[7] == 1
    no_start = [1, 5, 6, 10, 11, E, 2]
    assert remaining_lengths(no_start, 3, S, E) == naive_targets(no_start, 3, S, E)
    assert remaining_lengths([1, 5, S, 10, 11], 2, S, E) is None


def test_long_traces_keep_true_targets_and_unfinished_ones_are_counted(tokenizer):
    long_thought = "\n".join(f"{i}+{i}={2 * i}" for i in range(40))
    records = [
        Record({"prompt": "Compute 1 + 2.", "completion": "<think>\n1+2=3\n</think>\nThe answer is 3."}, "a"),
        Record({"prompt": "Compute 9 + 9.", "completion": f"<think>\n{long_thought}\n</think>\nThe answer is 18."},
               "b"),
        Record({"prompt": "Compute 4 + 4.", "completion": "<think>\n4+4=8 and no end"}, "c"),
    ]
    samples, report = encode_traces(records, tokenizer, max_length=40)
    assert (report.kept, report.truncated, report.no_think_end) == (2, 1, 1)
    full = (tokenizer("Compute 9 + 9.")["input_ids"]
            + tokenizer(records[1].fields["completion"], add_special_tokens=False)["input_ids"])
    S, E = ids(tokenizer, "<think>", "</think>")
    expected = naive_targets(full, len(tokenizer("Compute 9 + 9.")["input_ids"]), S, E)[:40]
    assert samples[1].remaining == expected and len(samples[1].input_ids) == 40
    assert max(expected) > 40  # the targets count the thinking cut away


def test_trace_files_with_empty_or_unfinished_completions_are_skipped_and_counted(tmp_path, tokenizer):
    import json

    from lightning_tokens.budget.data import read_traces

    path = tmp_path / "traces.jsonl"
    rows = [{"prompt": "Compute 1 + 2.", "completion": "<think>\n1+2=3\n</think>\nThe answer is 3."},
            {"prompt": "Compute 2 + 2.", "completion": ""},
            {"prompt": "Compute 3 + 2.", "completion": "<think>\n3+2="}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples, report = encode_traces(read_traces(path), tokenizer, max_length=64)
    assert (report.kept, report.no_think_end) == (1, 2) and len(samples) == 1
