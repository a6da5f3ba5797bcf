"""Atomic file writes (lightning_tokens/files.py)."""

from __future__ import annotations

import os
import stat

import pytest

from lightning_tokens.files import atomic_path


def test_the_file_appears_complete_with_nothing_left_beside_it(tmp_path):
    target = tmp_path / "deep" / "er" / "rows.jsonl"
    with atomic_path(target) as tmp:
        assert tmp.name == target.name and tmp.parent != target.parent
        tmp.write_text("one\ntwo\n")
        assert not target.exists()
    assert target.read_text() == "one\ntwo\n"
    assert os.listdir(target.parent) == ["rows.jsonl"]


def test_an_error_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "table.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["table.pt"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert os.listdir(tmp_path) == []


def test_the_file_gets_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_path(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
