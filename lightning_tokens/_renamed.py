"""The 0.1 import paths of renamed packages and modules, kept as aliases of the very same module objects."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Optional


def alias(old_name: str, new_name: str, renamed: Optional[dict[str, str]] = None) -> ModuleType:
    """Register the module ``new_name`` under ``old_name`` and, for a package, each submodule under its old name.

    The names go into ``sys.modules`` and onto their parent package, so ``import old.sub``, ``from old.sub import X``,
    pickles and LightningCLI ``class_path`` values naming an old path all give the objects of the new one (no copy).

    Args:
        old_name: The dotted name of 0.1, e.g. ``"lightning_tokens.selection"``.
        new_name: The dotted name it moved to, e.g. ``"lightning_tokens.sstoken"``.
        renamed: ``{old submodule name: new submodule name}`` for modules renamed inside the package, e.g.
            ``{"scores": "formulas"}``; every other submodule keeps its name. Default ``None``.

    Returns:
        The module ``new_name``.
    """
    module = importlib.import_module(new_name)
    submodules = {info.name: info.name for info in pkgutil.iter_modules(getattr(module, "__path__", []))}
    for old, new in (renamed or {}).items():
        if new not in submodules:
            raise ValueError(f"renamed: {new_name} has no submodule {new!r} (for the old name {old!r})")
        submodules[old] = new
    _register(old_name, module)
    for old, new in submodules.items():
        _register(f"{old_name}.{old}", importlib.import_module(f"{new_name}.{new}"))
    return module


def _register(name: str, module: ModuleType) -> None:
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)
