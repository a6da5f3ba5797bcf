"""The documentation site builds with warnings as errors, and its API reference documents every public name."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).with_name("mkdocs")


def test_api_reference_documents_every_public_name():
    source = (ROOT / "lightning_tokens" / "__init__.py").read_text()
    assignment = next(node for node in ast.parse(source).body
                      if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "__all__")
    public = set(ast.literal_eval(assignment.value))
    directives = re.findall(r"^::: lightning_tokens\.(\w+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert len(directives) == len(set(directives)), "a name is documented twice"
    assert set(directives) == public, {"undocumented": sorted(public - set(directives)),
                                       "not public": sorted(set(directives) - public)}


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages == listed, {"not in the nav": sorted(pages - listed), "missing": sorted(listed - pages)}


@pytest.mark.skipif(not MKDOCS.exists(), reason="mkdocs is not installed (the dev extra)")
def test_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    assert 'id="lightning_tokens.TokenSelection"' in api  # mkdocstrings rendered the docstrings
    # The included results pages: their text, and the figure they link, are in the site.
    assert "Experiments: the methods under their papers" in (site / "experiments" / "index.html").read_text()
    assert (site / "experiments" / "evidence_budget.png").read_bytes() == (
        ROOT / "experiments" / "evidence_budget.png").read_bytes()
    assert "lightning-tokens fit --config sft/tiny" in (site / "index.html").read_text().replace("&lt;", "<")
