"""The README names only things that exist: public classes and functions, config files, make targets."""

from __future__ import annotations

import re
from pathlib import Path

import lightning_tokens

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_config_and_notebook_path_in_the_readme_exists():
    paths = set(re.findall(r"configs/[\w./-]+\.yaml", README)) | set(re.findall(r"notebooks/[\w.-]+\.ipynb", README))
    assert paths, "the README should point at configs"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_every_class_named_in_the_readme_is_public_api():
    names = (set(re.findall(r"`([A-Z][A-Za-z0-9]+)`", README))
             | set(re.findall(r"import ([A-Z]\w+(?:, [A-Z]\w+)*)", README)))
    names = {n.strip() for group in names for n in group.split(",")}
    assert {"CausalLMModule", "TokenSelection"} <= names
    import lightning.pytorch as pl

    names = {n for n in names if not hasattr(pl, n) and not hasattr(pl.strategies, n)}  # Lightning's own
    names = {n for n in names if not n.isupper()}  # constants such as a notebook's MODEL parameter
    missing = sorted(n for n in names if not hasattr(lightning_tokens, n))
    assert not missing, missing


def test_every_function_imported_in_the_readme_is_public_api():
    imported = re.findall(r"from lightning_tokens import ([^\n]+)", README)
    names = {n.strip() for line in imported for n in line.split("#")[0].split(",")}
    missing = sorted(n for n in names if n and not hasattr(lightning_tokens, n))
    assert not missing, missing


def test_make_targets_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"(?:^|`)make ([\w-]+)", README, re.M)):
        assert re.search(rf"^{target}:", makefile, re.M), target
