"""Checks on checkpoint files and folders before a run leans on them, each failing with one clear message."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path


def check_checkpoint_file(path: str | os.PathLike, field: str = "ckpt_path") -> Path:
    """``path`` if it holds a readable PyTorch checkpoint, else a ``ValueError`` naming ``field`` and the file.

    ``torch.save`` writes a zip archive; a file killed mid-save is empty or truncated, which torch would
    report as a bare ``EOFError`` or an unpickling error deep in the load.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{field}: {path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{field}: {path} is empty (0 bytes), as a run killed while saving leaves it; "
                         "use another checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{field}: {path} is not a PyTorch checkpoint, or is truncated or corrupt "
                         f"({path.stat().st_size} bytes)")
    return path


def check_writable_dir(path: str | os.PathLike, field: str) -> Path:
    """Create ``path`` if needed and check a file can be written there, else a ``ValueError`` naming ``field``.

    Called before training starts, so an unwritable checkpoint folder fails at once, not at the first save.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"{field}: cannot write to {path} ({error.strerror or error})") from None
    return path
