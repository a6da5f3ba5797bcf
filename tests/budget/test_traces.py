"""Trace collection (budget/traces.py): the written traces are the model's own greedy completions; the command too."""

from __future__ import annotations

import pytest

from tests.budget.helpers import ids


def test_collect_traces_writes_the_models_own_traces(tmp_path, lm):
    import json

    from lightning_tokens.budget import TraceDataModule, collect_main, collect_traces
    from lightning_tokens.data.reasoning_task import thinking_length

    model, tokenizer = lm
    S, E = ids(tokenizer, "<think>", "</think>")
    prompts = [{"prompt": "Compute 1 + 2.<think>", "answer": "3"}, "Compute 5 - 3.<think>\n5-3=2\n"]
    rows = collect_traces(model, tokenizer, prompts, tmp_path / "t.jsonl", max_new_tokens=6, batch_size=2)
    assert [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == rows
    enc = tokenizer([p if isinstance(p, str) else p["prompt"] for p in prompts], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    for row, prompt_ids, new in zip(rows, enc["input_ids"].tolist(), out[:, enc["input_ids"].shape[1]:].tolist()):
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        assert row["completion"] == tokenizer.decode(new, skip_special_tokens=True)
        assert row["finished"] == (E in new)
        assert row["thinking_length"] == thinking_length(new, S, E)
    assert rows[0]["answer"] == "3" and "correct" in rows[0] and "correct" not in rows[1]
    # the command line, on a saved model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    collect_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "c.jsonl"), "--num", "3",
                  "--max-new-tokens", "4", "--batch-size", "2"])
    data = TraceDataModule(train_file=str(tmp_path / "c.jsonl"), val_file=str(tmp_path / "c.jsonl"))
    data.tokenizer = tokenizer
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 3
    finished = sum(json.loads(line)["finished"] for line in lines)
    if finished:
        data.setup()
        assert data.reports["train"].no_think_end == 3 - finished
    else:
        with pytest.raises(ValueError, match="no usable training trace"):
            data.setup()
