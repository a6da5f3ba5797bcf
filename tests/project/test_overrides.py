"""Every Lightning hook the package implements carries ``@override``, and every ``@override`` overrides something.

A misspelt hook (``on_train_batch_strat``) is an ordinary method that Lightning never calls; ``@override`` makes
the intent explicit, and the walk below turns a hook missing it, or an ``@override`` that overrides nothing, into a
failing test.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable, Optional

from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from transformers import LogitsProcessor
from typing_extensions import override

import lightning_tokens

# Classes whose methods Lightning (or transformers' generate) calls by name.
HOOK_BASES = (Callback, LightningModule, LightningDataModule, LightningCLI, LogitsProcessor)


def package_classes() -> list[type]:
    """Every class defined in a module of ``lightning_tokens`` (each module imported)."""
    classes = []
    for info in pkgutil.walk_packages(lightning_tokens.__path__, "lightning_tokens."):
        module = importlib.import_module(info.name)
        classes += [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    return list(dict.fromkeys(classes))


def _function(attribute: Any) -> Optional[Callable]:
    """The function behind a method, property, staticmethod or classmethod; None for anything else."""
    if isinstance(attribute, property):
        return attribute.fget
    if isinstance(attribute, (staticmethod, classmethod)):
        return attribute.__func__
    return attribute if inspect.isfunction(attribute) else None


def _methods(cls: type) -> dict[str, Callable]:
    """The methods ``cls`` itself defines, dunder methods left out except ``__call__``."""
    return {name: fn for name, value in vars(cls).items()
            if (fn := _function(value)) is not None and (not name.startswith("__") or name == "__call__")}


def _overrides(cls: type, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__[1:])


def missing_override(cls: type) -> list[str]:
    """Methods of ``cls`` that override a base class method without ``@override``."""
    return [f"{cls.__qualname__}.{name}" for name, fn in _methods(cls).items()
            if _overrides(cls, name) and not getattr(fn, "__override__", False)]


def override_of_nothing(cls: type) -> list[str]:
    """Methods of ``cls`` marked ``@override`` that no base class defines."""
    return [f"{cls.__qualname__}.{name}" for name, fn in _methods(cls).items()
            if getattr(fn, "__override__", False) and not _overrides(cls, name)]


def test_the_walk_finds_the_hook_classes():
    names = {c.__name__ for c in package_classes() if issubclass(c, HOOK_BASES)}
    assert {"CausalLMModule", "TokenSelection", "ConceptAwareFineTuning", "SFTDataModule", "PredictionWriter",
            "BudgetForcing", "TokensCLI"} <= names


def test_the_checks_catch_a_misspelt_hook_and_a_missing_override():
    class Misspelt(Callback):
        @override
        def on_train_batch_strat(self, trainer, pl_module, batch, batch_idx):  # the typo Lightning never calls
            pass

        def on_train_end(self, trainer, pl_module):
            pass

        @property
        @override
        def state_key(self) -> str:
            return "misspelt"

    assert override_of_nothing(Misspelt) == [f"{Misspelt.__qualname__}.on_train_batch_strat"]
    assert missing_override(Misspelt) == [f"{Misspelt.__qualname__}.on_train_end"]


def test_every_hook_carries_override():
    missing = [m for c in package_classes() if issubclass(c, HOOK_BASES) for m in missing_override(c)]
    assert not missing, f"add @override (from typing_extensions import override) to: {missing}"


def test_every_override_overrides_something():
    wrong = [m for c in package_classes() for m in override_of_nothing(c)]
    assert not wrong, f"@override on methods no base class defines (a misspelt hook?): {wrong}"


def test_mixin_hooks_are_lightning_module_hooks():
    # A mixin (listed before LightningModule) derives from object only, so ``@override`` on it would be untrue;
    # its hook-like methods are checked by name instead.
    mixins = {base for c in package_classes() if issubclass(c, LightningModule) for base in c.__mro__
              if base.__module__.startswith("lightning_tokens.") and not issubclass(base, LightningModule)}
    assert mixins, "no LightningModule mixin found"
    unknown = [f"{m.__qualname__}.{name}" for m in mixins for name in _methods(m)
               if name.startswith(("on_", "configure_")) and not hasattr(LightningModule, name)]
    assert not unknown, f"mixin methods named like hooks that LightningModule does not have: {unknown}"
