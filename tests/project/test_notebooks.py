"""Committed notebooks: no stale outputs, one parameter cell, public API only. (CI executes them with nbmake.)"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

import lightning_tokens

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_and_uses_the_public_api(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip the outputs"
    assert notebook.cells[0].cell_type == "markdown", "start with a title cell"
    assert any(re.search(r"^MODEL\s*=", cell.source, re.M) for cell in code), "a MODEL parameter cell"
    source = "\n".join(cell.source for cell in code)
    imported = re.findall(r"^from lightning_tokens import \(([^)]*)\)", source, re.M)
    imported += re.findall(r"^from lightning_tokens import ([^(\n]+)$", source, re.M)
    names = {name.split("#")[0].strip() for group in imported for name in group.replace("\n", ",").split(",")}
    names.discard("")
    missing = sorted(name for name in names if not hasattr(lightning_tokens, name))
    assert not missing, missing
