"""A part for the tests of :mod:`experiments.protocols.jobs`: a run that reports where and how it ran."""

from __future__ import annotations

import os


def run_one(rows: list[list[int]], name: str, fail: bool = False) -> dict:
    """The non-zero entries per row, the run's torch threads and working folder; raise when ``fail``."""
    import torch

    print(f"testing run {name}", flush=True)
    if fail:
        raise ValueError("asked to fail")
    lengths = (torch.tensor(rows) != 0).sum(dim=1).tolist()
    return dict(name=name, lengths=lengths, threads=torch.get_num_threads(), cwd=os.getcwd())
