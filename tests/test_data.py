"""SFT data: formats, completion-only labels, templates, truncation, splits, and every bad-input error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_tokens.data.encode import IGNORE_INDEX, SFTCollator, apply_truncation, encode_record
from lightning_tokens.data.module import EpochSeededSampler, SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.records import DataError, Record, read_file

ROWS = [
    {"prompt": "Compute 1 + 2.", "completion": "<think>\n1+2=3\n</think>\nThe answer is 3.", "answer": "3"},
    {"prompt": "Compute 4 - 1.", "completion": "<think>\n4-1=3\n</think>\nThe answer is 3.", "answer": "3"},
    {"prompt": "Compute 5 + 5.", "completion": "<think>\n5+5=10\n</think>\nThe answer is 10.", "answer": "10"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_file_format_reads_the_same_records(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert [r.fields for r in read_file(path)] == ROWS


def test_hub_style_dataset_from_a_local_directory(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS * 4)
    data = SFTDataModule(dataset=str(folder), val_fraction=0.25, batch_size=2)
    data.setup()
    assert len(data.train_dataset) == 9 and len(data.val_dataset) == 3


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_file(path)


def test_missing_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "x", "response": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'completion'.*has: prompt, response"):
        read_file(path)


def test_empty_file_and_empty_response_are_reported(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no records"):
        read_file(empty)
    path = write_jsonl(tmp_path / "e.jsonl", [ROWS[0], {"prompt": "x", "completion": "  "}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: empty response"):
        read_file(path)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*no 'assistant' message"):
        read_file(chat)


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_file(tmp_path / "nope.jsonl")
    other = tmp_path / "x.csv"
    other.write_text("a")
    with pytest.raises(DataError, match="unknown extension"):
        read_file(other)


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


def test_datamodule_reports_drops_and_rejects_all_too_long(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    data = SFTDataModule(train_file=str(path), max_length=8, truncation="drop", val_fraction=0.0)
    with pytest.raises(DataError, match="longer than max_length=8"):
        data.setup()


def test_deterministic_split_and_epoch_seeded_order(tmp_path):
    rows = [dict(r, prompt=r["prompt"] + f" #{i}") for i, r in enumerate(ROWS * 10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first, second = (SFTDataModule(train_file=str(path), val_fraction=0.2, seed=3) for _ in range(2))
    first.setup(), second.setup()
    assert [s.origin for s in first.val_dataset.samples] == [s.origin for s in second.val_dataset.samples]
    assert len(first.val_dataset) == 6
    sampler = EpochSeededSampler(first.train_dataset, seed=5)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != epoch1
    sampler.set_epoch(1)
    assert list(sampler) == epoch1


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


def test_task_is_the_default_source_and_carries_answers():
    data = SFTDataModule(task=ReasoningTask(num_train=40, num_val=8), batch_size=4)
    data.setup()
    assert len(data.train_dataset) == 40 and len(data.val_dataset) == 8
    batch = next(iter(data.val_dataloader()))
    assert "prompt_input_ids" in batch and all(a is not None for a in batch["answers"])


def test_invalid_datamodule_arguments_name_the_field():
    with pytest.raises(ValueError, match="SFTDataModule.val_fraction"):
        SFTDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="SFTDataModule.truncation"):
        SFTDataModule(truncation="cut")


# -- bad files: one error naming the file, the line (or record) and the field --------------------------------
def test_non_utf8_bytes_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(ROWS[0]) + "\n").encode()
                     + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_file(path)
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "caf\xe9", "completion": "x"}\n]')
    with pytest.raises(DataError, match=r"latin1\.json:3: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_file(whole)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, suffix):
    path = tmp_path / f"bom{suffix}"
    text = "".join(json.dumps(r) + "\n" for r in ROWS) if suffix == ".jsonl" else json.dumps(ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r.fields for r in read_file(path)] == ROWS


@pytest.mark.parametrize("role", ["wizard", 7])
def test_an_unknown_chat_role_is_named(tmp_path, role):
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": "x"},
                {"role": "assistant", "content": "y"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=rf"chat\.jsonl:1: messages\[1\]\.role is {role!r}; use one of system, user"):
        read_file(path)


def test_a_directory_as_train_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"a directory, not a records file"):
        read_file(tmp_path)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_an_over_long_record_is_cut_before_tokenizing_with_the_same_result(tmp_path, tokenizer, policy, monkeypatch):
    long_completion = "<think>\n" + "12+34=46\n" * 200_000 + "</think>\nThe answer is 46."  # 1.8 MB
    rows = [ROWS[0], {"prompt": "Compute 12 + 34.", "completion": long_completion}, ROWS[1]]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    seen = []
    original = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    data = SFTDataModule(train_file=str(path), max_length=64, truncation=policy, val_fraction=0.0)
    data.tokenizer = tokenizer
    data.setup()
    assert max(seen) <= (64 + 8) * max(len(t) for t in tokenizer.get_vocab())  # never the whole 1.8 MB
    report = data.reports["train"]
    assert (report.truncated, report.dropped) == ((1, 0) if policy == "truncate" else (0, 1))
    if policy == "truncate":
        monkeypatch.setattr(type(tokenizer), "__call__", original)
        full = encode_record(tokenizer, Record(rows[1], "full"))
        kept = [s for s in data.train_dataset.samples if len(s.input_ids) == 64]
        assert len(kept) == 1 and kept[0].input_ids == full.input_ids[:64] and kept[0].labels == full.labels[:64]
