"""Speed and memory scripts, each ``<method or topic>_<speed|memory>.py``, run as modules from the repository root.

    python -m benchmarks.sstoken_speed --help

Each prints its own ratios against the plain baseline measured in the same run; ``benchmarks/README.md`` holds
the current figures and the command behind each. Shared helpers: :mod:`benchmarks.common`. The evidence runs
(what the methods learn) are a separate package, ``experiments/``.
"""
