"""The README and the documentation pages name only things that exist: public classes and functions, packaged
configs (by name, or by the old ``configs/...yaml`` path), notebooks, make targets."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import lightning.pytorch.cli  # noqa: F401 (pl.cli below)
import pytest
import transformers

import lightning_tokens

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
METHODS = ("sft", "sstoken", "caft", "quiet_star", "budget")
# A config name in backticks or after --config: `sft/tiny`, `caft/heads-tiny` (a method folder, then a model).
#: Classes of other projects that the pages compare with (TRL is not a dependency).
OTHER_PROJECTS = {"SFTTrainer"}
CONFIG_NAME = re.compile(r"(?:`|--config )((?:%s)/[\w.-]+?)(?:\.yaml)?(?=[`\s])" % "|".join(METHODS))


def _packaged_names() -> set[str]:
    root = ROOT / "lightning_tokens" / "configs"
    return {path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml")}


def test_every_config_named_in_the_readme_and_docs_is_packaged():
    names = _packaged_names()
    assert {"sft/tiny", "caft/heads-tiny"} <= names
    named = {(page, m) for page, text in TEXT.items() for m in CONFIG_NAME.findall(text)}
    old_paths = {(page, p[len("configs/"):-len(".yaml")]) for page, text in TEXT.items()
                 for p in re.findall(r"configs/[\w./-]+\.yaml", text) if not p.startswith("lightning_tokens/")}
    assert {"sft/tiny", "sstoken/tiny", "budget/tiny"} <= {name for page, name in named if page == "README.md"}
    missing = sorted(f"{page}: {name}" for page, name in named | old_paths if name not in names)
    assert not missing, missing


def test_every_packaged_config_is_named_in_the_docs():
    named = {m for text in TEXT.values() for m in CONFIG_NAME.findall(text)}
    assert not _packaged_names() - named, sorted(_packaged_names() - named)


def test_every_notebook_path_exists():
    paths = {(page, p) for page, text in TEXT.items() for p in re.findall(r"notebooks/[\w.-]+\.ipynb", text)}
    assert len({p for _, p in paths}) == len(list((ROOT / "notebooks").glob("*.ipynb")))
    missing = sorted(f"{page}: {p}" for page, p in paths if not (ROOT / p).exists())
    assert not missing, missing


@pytest.mark.parametrize("page", list(TEXT))
def test_every_class_named_exists(page):
    text = TEXT[page]
    names = set(re.findall(r"`([A-Z][A-Za-z0-9]+)`", text)) | {
        n.strip() for group in re.findall(r"import ([A-Z]\w+(?:, [A-Z]\w+)*)", text) for n in group.split(",")}
    lightning_names = (pl, pl.strategies, pl.loggers, pl.cli)
    names = {n for n in names if not any(hasattr(m, n) for m in lightning_names)}  # Lightning's own
    names = {n for n in names if not n.isupper()}  # constants such as a notebook's MODEL parameter
    names -= OTHER_PROJECTS
    names = {n for n in names if not hasattr(transformers, n)}  # transformers' own (TrainerCallback)
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("lightning_tokens.")]
    missing = sorted(n for n in names if not any(hasattr(m, n) for m in [lightning_tokens, *modules]))
    assert not missing, missing


@pytest.mark.parametrize("page", list(TEXT))
def test_every_name_imported_from_lightning_tokens_is_public_api(page):
    imported = re.findall(r"from lightning_tokens import ([^\n]+)", TEXT[page])
    names = {n.strip() for line in imported for n in line.split("#")[0].split(",")}
    missing = sorted(n for n in names if n and not hasattr(lightning_tokens, n))
    assert not missing, missing


def test_readme_names_the_main_classes():
    assert {"CausalLMModule", "TokenSelection"} <= set(re.findall(r"`([A-Z][A-Za-z0-9]+)`", TEXT["README.md"]))


def test_make_targets_named_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = {t for text in TEXT.values() for t in re.findall(r"(?:^|`)make ([\w-]+)", text, re.M)}
    assert {"test", "quickstart", "docs"} <= targets
    missing = sorted(t for t in targets if not re.search(rf"^{t}:", makefile, re.M))
    assert not missing, missing


def test_readme_links_to_docs_pages_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)", TEXT["README.md"])
    assert any(link.startswith("docs/") for link in links)
    missing = sorted(link for link in links if "://" not in link and not (ROOT / link).exists())
    assert not missing, missing
