"""The test tree mirrors the package: the tests of ``lightning_tokens/x/y.py`` are in ``tests/x/test_y.py``.

A module with many tests may spread them over ``tests/x/test_y_<aspect>.py``. Tests that drive several modules at
once live in ``tests/integration/``, checks of the repository itself in ``tests/project/``, CUDA-only tests in
``tests/gpu/``. Exempt from having a file: ``__init__.py`` (re-exports), ``__main__.py`` and the 0.1 alias shims,
whose behaviour ``tests/test_renamed.py`` checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_tokens"
TESTS = ROOT / "tests"
CROSS_CUTTING = {"integration", "project", "gpu"}


def is_alias_shim(path: Path) -> bool:
    """A module whose code is only a call to ``_renamed.alias`` (a 0.1 import path kept as an alias)."""
    body = [node for node in ast.parse(path.read_text()).body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]  # docstring
    return (bool(body) and all(isinstance(node, (ast.ImportFrom, ast.Expr)) for node in body)
            and any(isinstance(node, ast.ImportFrom) and node.module == "lightning_tokens._renamed" for node in body))


def modules_needing_tests() -> dict[Path, Path]:
    """``{module path: the test file it needs}``, both relative to the repository."""
    needed = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in {"__init__.py", "__main__.py"} or is_alias_shim(path):
            continue
        if (path.parent / "__init__.py").exists() and is_alias_shim(path.parent / "__init__.py"):
            continue
        relative = path.relative_to(PACKAGE)
        needed[path.relative_to(ROOT)] = Path("tests", *relative.parts[:-1], f"test_{path.stem.lstrip('_')}.py")
    return needed


def module_of(test_file: Path) -> Path | None:
    """The module a mirrored test file tests: the longest module name its ``test_<name>[_<aspect>]`` starts with."""
    relative = test_file.relative_to(TESTS)
    folder = PACKAGE.joinpath(*relative.parts[:-1])
    stem = relative.stem.removeprefix("test_")
    names = {path.stem.lstrip("_"): path for path in folder.glob("*.py")} if folder.is_dir() else {}
    matches = [name for name in names if stem == name or stem.startswith(name + "_")]
    return names[max(matches, key=len)] if matches else None


def test_the_rule_on_known_cases():
    assert module_of(TESTS / "sstoken" / "test_history.py") == PACKAGE / "sstoken" / "history.py"
    assert module_of(TESTS / "caft" / "test_mtp_drafter.py") == PACKAGE / "caft" / "mtp_drafter.py"
    assert module_of(TESTS / "caft" / "test_mtp_training.py") == PACKAGE / "caft" / "mtp.py"
    assert module_of(TESTS / "test_renamed.py") == PACKAGE / "_renamed.py"
    assert module_of(TESTS / "sstoken" / "test_nothing.py") is None
    assert is_alias_shim(PACKAGE / "module.py") and not is_alias_shim(PACKAGE / "sft.py")


def test_every_module_has_its_test_file():
    missing = [f"{module} -> {test}" for module, test in modules_needing_tests().items() if not (ROOT / test).exists()]
    assert not missing, "modules without their test file:\n" + "\n".join(missing)


def test_every_mirrored_test_file_names_a_module():
    orphans = [str(path.relative_to(ROOT)) for path in sorted(TESTS.rglob("test_*.py"))
               if path.relative_to(TESTS).parts[0] not in CROSS_CUTTING and module_of(path) is None]
    assert not orphans, "test files that mirror no module (rename them, or move them to integration/ or project/):\n" \
        + "\n".join(orphans)


def test_every_test_folder_is_a_package():
    folders = {path.parent for path in TESTS.rglob("*.py")}
    assert all((folder / "__init__.py").exists() for folder in folders), "add an empty __init__.py"


def test_no_test_file_imports_another():
    """Shared helpers live in non-test modules (``tests/tiny.py``, ``tests/<pkg>/naive.py``), never in a test file."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {module}" for module in modules
                          if module.startswith("tests") and module.rpartition(".")[2].startswith("test_")]
    assert not offenders, "\n".join(offenders)
