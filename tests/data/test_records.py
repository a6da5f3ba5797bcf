"""Reading records files (lightning_tokens/data/records.py): every format, and every bad input as one error naming
the file, the line (or record) and the field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_tokens.data.records import DataError, read_file
from tests.data.builders import ROWS, write_jsonl


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
