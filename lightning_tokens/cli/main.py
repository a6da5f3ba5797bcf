"""``main``: the entry point of the ``lightning-tokens`` console script, one error line for a bad value."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

from lightning_tokens.cli.commands import EXTRA_COMMANDS
from lightning_tokens.cli.configs import ConfigError
from lightning_tokens.cli.lightning_cli import build_cli
from lightning_tokens.data.records import DataError


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-tokens`` console script (``argv`` default: the command line)."""
    # Lightning 2.6 builds torch's deprecated LeafSpec in every fit and predict (torch 2.13 warns each time):
    # nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    words = sys.argv[1:] if argv is None else argv
    command = EXTRA_COMMANDS.get(words[0]) if words else None
    # LightningCLI turns a bad value into a ConfigError (a DataError is a bad file). The other commands check their
    # options and files before loading a model, and any ValueError they raise is a value the user has to fix.
    bad_value = ValueError if command is not None else (ConfigError, DataError)
    try:
        if command is not None:
            command(words[1:])
        else:
            build_cli(argv)  # None: LightningCLI reads the command line itself (given as a list, it warns)
    except bad_value as error:
        print(f"lightning-tokens: error: {error}", file=sys.stderr)
        sys.exit(2)
