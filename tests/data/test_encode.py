"""Encoding records for SFT (lightning_tokens/data/encode.py): completion-only labels, chat templates, truncation
policies and the collator's padding."""

from __future__ import annotations

from lightning_tokens.data.encode import IGNORE_INDEX, SFTCollator, apply_truncation, encode_record
from lightning_tokens.data.records import Record
from tests.data.builders import ROWS


def test_prompt_completion_labels_are_completion_only(tokenizer):
    sample = encode_record(tokenizer, Record(ROWS[0], "x"))
    prompt = [tokenizer.bos_token_id] + tokenizer(ROWS[0]["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(ROWS[0]["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sample.input_ids == prompt + completion
    assert sample.labels == [IGNORE_INDEX] * len(prompt) + completion
    assert sample.prompt_length == len(prompt)


def test_messages_fallback_template_trains_on_every_assistant_reply(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    sample = encode_record(tokenizer, Record({"messages": messages}, "x"))
    targets = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    expected = (tokenizer("Hello", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                + tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    assert targets == expected
    text = tokenizer.decode(sample.input_ids)
    assert "system: Be brief.\nuser: Hi\nassistant: Hello" in text


def test_messages_with_a_chat_template(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    sample = encode_record(tokenizer, Record({"messages": messages}, "x"))
    assert tokenizer.decode(sample.input_ids) == "[user]Hi[assistant]Yo</s>[user]Bye[assistant]Ciao</s>"
    targets = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    assert targets == "Yo</s>Ciao</s>"


def test_truncation_policies_and_counts(tokenizer):
    samples = [encode_record(tokenizer, Record(r, f"r{i}")) for i, r in enumerate(ROWS)]
    lengths = [len(s.input_ids) for s in samples]
    limit = sorted(lengths)[1]
    kept, report = apply_truncation(samples, limit, "truncate")
    assert report.truncated == sum(n > limit for n in lengths) and report.dropped == 0
    assert all(len(s.input_ids) <= limit for s in kept) and len(kept) == 3
    kept, report = apply_truncation(samples, limit, "drop")
    assert report.dropped == sum(n > limit for n in lengths) and len(kept) == 3 - report.dropped
    prompt_only = min(s.prompt_length for s in samples)
    kept, report = apply_truncation(samples, prompt_only, "truncate")
    assert report.dropped == 3 and not kept


def test_collator_pads_right_and_prompts_left(tokenizer):
    samples = [encode_record(tokenizer, Record(r, f"r{i}")) for i, r in enumerate(ROWS[:2])]
    batch = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8, generation=True)(
        [(samples[0], "3"), (samples[1], None)])
    assert batch["input_ids"].shape[1] % 8 == 0
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        assert batch["input_ids"][row, :n].tolist() == sample.input_ids
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()].tolist()
        assert prompt == sample.input_ids[: sample.prompt_length]
        assert batch["prompt_attention_mask"][row, -1] == 1  # left padded
    assert batch["answers"] == ["3", None]
