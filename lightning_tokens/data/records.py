"""Read SFT records from JSONL, JSON, parquet files or a hub dataset, with errors that point at the record.

A record is either ``{"prompt": ..., "completion": ...}`` or a chat ``{"messages": [{"role", "content"}...]}``.
Each record read keeps its origin (``file:line`` or ``dataset[split] row n``) so a later problem (an
empty response, a sample too long) can name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional


class DataError(ValueError):
    """Bad input data; the message names the file and line (or dataset row) and the field."""


@dataclass(frozen=True)
class Record:
    """One SFT example and where it came from."""

    fields: dict[str, Any]
    origin: str


#: Chat roles a record may use (what Hugging Face chat templates render).
ROLES = ("system", "user", "assistant", "tool")


def _decode(raw: bytes, path: Path, line_number: int) -> str:
    """UTF-8 text of ``raw`` (a leading byte-order mark dropped), or an error naming the line and column."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = line_number + raw.count(b"\n", 0, error.start)
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def _jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, line_number)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno})") from None
            yield Record(value, f"{path}:{line_number}")


def _json(path: Path) -> Iterator[Record]:
    try:
        value = json.loads(_decode(path.read_bytes(), path, 1))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), got {type(value).__name__}")
    for index, item in enumerate(value):
        yield Record(item, f"{path} record {index}")


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield Record(row, f"{path} row {index}")


READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}


def read_file(path: str | Path, check: Optional[Callable[[Record], Record]] = None) -> list[Record]:
    """All records of a ``.jsonl``, ``.json`` or ``.parquet`` file.

    Args:
        path: The file.
        check: Validates one record and returns it, or raises :class:`DataError`. Default
            :func:`check_record` (SFT records).
    """
    check = check or check_record
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a records file (a 🤗 dataset directory goes in 'dataset')")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown extension {path.suffix!r} (use {', '.join(READERS)})")
    records = [check(record) for record in reader(path)]
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def read_hub_dataset(name: str, split: str, config: Optional[str] = None) -> list[Record]:
    """All records of one split of a 🤗 dataset (hub name or local dataset directory)."""
    import datasets

    rows = datasets.load_dataset(name, config, split=split)
    records = [check_record(Record(dict(row), f"{name}[{split}] row {i}")) for i, row in enumerate(rows)]
    if not records:
        raise DataError(f"{name}[{split}]: the split holds no records")
    return records


def from_dicts(rows: Iterable[dict[str, Any]], source: str) -> list[Record]:
    """Records from in-memory dicts (``source`` names them in errors)."""
    return [check_record(Record(row, f"{source} record {i}")) for i, row in enumerate(rows)]


def check_record(record: Record) -> Record:
    """``record`` if it is a well-formed prompt/completion or messages record, else a :class:`DataError`."""
    fields = _object_fields(record)
    if "messages" in fields:
        _check_messages(fields["messages"], record.origin)
        return record
    for name in ("prompt", "completion"):
        if name not in fields:
            keys = ", ".join(sorted(fields)) or "none"
            raise DataError(f"{record.origin}: missing field {name!r} (records need 'prompt' and 'completion', "
                            f"or 'messages'; this one has: {keys})")
        if not isinstance(fields[name], str):
            raise DataError(f"{record.origin}: field {name!r} must be a string, got {type(fields[name]).__name__}")
    if not fields["completion"].strip():
        raise DataError(f"{record.origin}: empty response in field 'completion'")
    return record


def _object_fields(record: Record) -> dict[str, Any]:
    if not isinstance(record.fields, dict):
        raise DataError(f"{record.origin}: a record must be a JSON object, got {type(record.fields).__name__}")
    return record.fields


def check_prompt_record(record: Record) -> Record:
    """``record`` if it has a string ``"prompt"`` (what ``predict`` needs; a completion is optional)."""
    fields = _object_fields(record)
    if not isinstance(fields.get("prompt"), str):
        problem = "missing field 'prompt'" if "prompt" not in fields else "field 'prompt' must be a string"
        raise DataError(f"{record.origin}: {problem} (prompts to predict are {{\"prompt\": ...}} records)")
    return record


def _check_messages(messages: Any, origin: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{origin}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{origin}: messages[{index}] needs 'role' and 'content' fields")
        if not isinstance(message["content"], str):
            raise DataError(f"{origin}: messages[{index}].content must be a string")
        if message["role"] not in ROLES:
            raise DataError(f"{origin}: messages[{index}].role is {message['role']!r}; use one of {', '.join(ROLES)}")
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise DataError(f"{origin}: field 'messages' has no 'assistant' message to train on")
    if any(not m["content"].strip() for m in replies):
        raise DataError(f"{origin}: empty response in an 'assistant' message")
