"""Atomic file writes: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; it replaces ``path`` when the block ends without error.

    The temporary file lies in a fresh hidden folder beside ``path`` (same file system, so the final rename is
    atomic; the same base name, so writers that look at the suffix still see it). On an error nothing is
    renamed and the temporary file is removed: a reader never sees a half-written ``path``. Missing parent
    folders are created.

    Example::

        with atomic_path("out/table.pt") as tmp:
            torch.save(payload, tmp)

    Args:
        path: The file to write.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp = folder / path.name
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
