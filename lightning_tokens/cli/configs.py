"""The configs shipped inside the package: found by name, listed, and copied out to edit.

A packaged config is named by its path under ``lightning_tokens/configs`` without ``.yaml``: ``sft/tiny``,
``caft/heads-tiny``. Every ``--config`` value of every command goes through :func:`resolve_config`: an existing
file wins, otherwise the value is read as a packaged name (``sft/tiny``, ``sft/tiny.yaml`` and a path into a 0.1
checkout, ``configs/sft/tiny.yaml`` or ``/any/where/configs/sft/tiny.yaml``, all name the same config). Paths
written inside a config (``default_root_dir``, ``heads_path``, data files) are relative to the folder the command
runs in, wherever the config itself lives, so a packaged config and a copy of it write and read the same places.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

CONFIG_OPTIONS = ("--config", "-c")


class ConfigError(ValueError):
    """A value the command cannot run with; the console script prints the message alone and exits with 2."""


def packaged_config_dir() -> Path:
    """The folder of the packaged configs (inside the installed package)."""
    return Path(str(files("lightning_tokens").joinpath("configs")))


@dataclass(frozen=True)
class PackagedConfig:
    """One config shipped in the package.

    Args:
        name: Its name, the path under the configs folder without ``.yaml`` (``"sft/tiny"``).
        method: The method it runs, its folder (``"sft"``, ``"sstoken"``, ``"caft"``, ``"quiet_star"``, ``"budget"``).
        description: The first line of its header comment.
        path: The file.
    """

    name: str
    method: str
    description: str
    path: Path


def packaged_configs() -> list[PackagedConfig]:
    """Every packaged config, sorted by name."""
    root = packaged_config_dir()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).with_suffix("").as_posix()
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        description = first.lstrip("#").strip() if first.startswith("#") else ""
        found.append(PackagedConfig(name, name.split("/")[0], description, path))
    return found


def _as_name(value: str) -> str:
    path = Path(value)
    if len(path.parts) >= 3 and path.parts[-3] == "configs":  # a path into a 0.1 checkout's configs/ folder
        path = Path(*path.parts[-2:])
    name = path.as_posix()
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def find_config(value: str) -> PackagedConfig:
    """The packaged config ``value`` names (``sft/tiny``, ``sft/tiny.yaml`` or ``configs/sft/tiny.yaml``).

    Raises:
        ConfigError: No packaged config has that name; the message names the closest ones.
    """
    by_name = {config.name: config for config in packaged_configs()}
    name = _as_name(value)
    if name in by_name:
        return by_name[name]
    close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"--config {value}: no such file, and no packaged config of that name.{hint} "
                      "'lightning-tokens configs' lists the packaged configs.")


def resolve_config(value: str) -> str:
    """The file a ``--config`` value means: ``value`` itself when it is an existing file, else the packaged config
    of that name (see :func:`find_config`); a YAML string (jsonargparse accepts one) is returned unchanged."""
    if Path(value).is_file() or "\n" in value or value.lstrip().startswith("{"):
        return value
    return str(find_config(value).path)


def resolve_config_args(words: Sequence[str]) -> list[str]:
    """``words`` with the value of every ``--config``/``-c`` option (either spelling, ``--config=VALUE`` too)
    replaced by the file it means (:func:`resolve_config`)."""
    resolved, take_next = [], False
    for word in words:
        if take_next:
            resolved.append(resolve_config(word))
            take_next = False
        elif word in CONFIG_OPTIONS:
            resolved.append(word)
            take_next = True
        elif word.startswith("--config="):
            resolved.append("--config=" + resolve_config(word.removeprefix("--config=")))
        else:
            resolved.append(word)
    return resolved


def copy_config(name: str, destination: str, force: bool = False) -> Path:
    """Copy the packaged config ``name`` to ``destination`` (a file, or an existing folder to copy it into).

    Args:
        name: The packaged config (as :func:`find_config` reads it).
        destination: The new file's path, or a folder (it keeps the config's file name there).
        force: Overwrite an existing file. Default ``False``.

    Returns:
        The written file.

    Raises:
        ConfigError: An unknown name, an existing file without ``force``, or a missing parent folder.
    """
    config = find_config(name)
    target = Path(destination)
    if target.is_dir():
        target = target / config.path.name
    if target.exists() and not force:
        raise ConfigError(f"configs copy: {target} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise ConfigError(f"configs copy: the folder {target.parent} does not exist")
    shutil.copyfile(config.path, target)
    return target


def configs_main(argv: list[str]) -> None:
    """``lightning-tokens configs``: list the packaged configs, or copy one out to edit.

    ::

        lightning-tokens configs                              # name, method, description of each
        lightning-tokens configs copy sft/tiny my.yaml        # then: lightning-tokens fit --config my.yaml

    Args:
        argv: Nothing or ``list`` to list; ``copy NAME DESTINATION [--force]`` to copy.
    """
    parser = argparse.ArgumentParser(prog="lightning-tokens configs", description=configs_main.__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action")
    actions.add_parser("list", help="list the packaged configs (the default)")
    copy = actions.add_parser("copy", help="copy a packaged config into a file or folder")
    copy.add_argument("name", help="a packaged config, e.g. sft/tiny")
    copy.add_argument("destination", help="the new file, or an existing folder")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if args.action == "copy":
        target = copy_config(args.name, args.destination, force=args.force)
        print(f"copied {_as_name(args.name)} to {target}; run it with: lightning-tokens fit --config {target}")
        return
    configs = packaged_configs()
    width = max(len(config.name) for config in configs)
    method_width = max(len(config.method) for config in configs)
    for config in configs:
        print(f"{config.name:<{width}}  {config.method:<{method_width}}  {config.description}")
