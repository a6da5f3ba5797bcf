"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def in_a_scratch_folder(tmp_path, monkeypatch):
    """Runs the test in its ``tmp_path``: the configs log to runs/ under the working directory."""
    monkeypatch.chdir(tmp_path)
