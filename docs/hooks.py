"""mkdocs hook: the repository files that the included result pages link, served at the same place in the site.

``docs/benchmarks/README.md`` and ``docs/experiments/README.md`` include the repository's ``benchmarks/README.md``
and ``experiments/README.md`` (pymdownx.snippets) from the same relative place, so a link between the two pages
or to a file beside them (``evidence_budget.png``, a benchmark script) resolves in the site as it does in the
repository. Any other broken link stays a warning, which ``mkdocs build --strict`` turns into an error.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
MIRRORED = ("benchmarks", "experiments")
SUFFIXES = {".png", ".svg", ".jpg", ".py", ".sh"}


def on_files(files: Files, config) -> Files:
    for folder in MIRRORED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
                uri = path.relative_to(ROOT).as_posix()
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
