"""What the speed and memory scripts share: the device argument, synchronised timing and ratio printing."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add ``--device`` to ``parser``.

    Args:
        parser: The script's argument parser.
        default: The device when none is given. Default ``None``: ``"cuda"`` when CUDA is available, else ``"cpu"``.
    """
    if default is None:
        default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default)


def synchronize(device: str | torch.device) -> None:
    """Wait for the queued kernels of ``device`` when it is a CUDA device, so that a clock read after it is honest.

    Args:
        device: The device the timed work runs on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (the only call when none is left).

    Args:
        fn: The work to time, called without arguments.
        device: Its device, synchronised before and after each call (see :func:`synchronize`).
        repeats: Timed calls.
        warmup: Calls before them whose times are dropped. Default ``1``.
    """
    times = []
    for _ in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:] or times)


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` as printed in the tables, e.g. ``"1.23x"``.

    Args:
        value: The measured figure of a variant.
        baseline: The same figure of the plain baseline measured in the same run.
    """
    return f"{value / baseline:.2f}x"
