"""Run an experiment's independent runs side by side, one process and one thread each, results as JSON files.

A run is ``(part, name, kwargs)``: ``experiments.protocols.<part>.run_one(**kwargs)`` returns a dict that lands in
``<out>/<name>.json``. A run whose JSON exists is not run again, so an interrupted experiment resumes where it
stopped; its log is ``<out>/<name>.log``. Each run is a new interpreter (``python -m experiments.protocols.jobs``,
started in the repository root) with one thread. Forking runs from a server that had imported torch, Lightning,
transformers and PEFT once saved nothing measurable: the imports it skipped came back as a slower run.

``evidence.py all`` runs its parts side by side, one thread each, over one pool of cores (:func:`share_cores`): a
part waiting on its own sequential stages (the budget part's fine-tuning, CAFT's stage 1) leaves its core to
another part's runs instead of idling it. Cores go to the parts in turn (first come, first served), so no part
starves another.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from lightning_tokens.files import atomic_path

ROOT = Path(__file__).resolve().parents[2]  # the repository: runs start there


class _CorePool:
    """Cores shared by parts running in threads of one process, handed out in the order the threads asked."""

    def __init__(self, cores: int):
        self.free = cores
        self.waiting: deque[int] = deque()
        self.lock = threading.Lock()

    def try_take(self) -> bool:
        me = threading.get_ident()
        with self.lock:
            if me not in self.waiting:
                self.waiting.append(me)
            if self.free and self.waiting[0] == me:
                self.waiting.popleft()
                self.free -= 1
                return True
            return False

    def give(self) -> None:
        with self.lock:
            self.free += 1


#: The shared pool while ``evidence.py all`` runs parts side by side; ``None``: each part has its ``jobs`` to itself.
_pool: Optional[_CorePool] = None
#: Steps run inside the main process seed its global random generators: one at a time.
_in_process_lock = threading.Lock()


def share_cores(cores: int) -> None:
    """Let parts run side by side in threads of this process, ``cores`` runs at a time across all of them."""
    import torch

    global _pool
    _pool = _CorePool(cores)
    torch.set_num_threads(1)  # in-process steps hold one core of the pool, like a run


@contextmanager
def in_process_step():
    """Hold one core of the shared pool (if any) for a step a part runs in this process, one such step at a time."""
    with _in_process_lock:
        while _pool is not None and not _pool.try_take():
            time.sleep(0.5)
        try:
            yield
        finally:
            if _pool is not None:
                _pool.give()


def _take_core() -> bool:
    return _pool is None or _pool.try_take()


def _give_core() -> None:
    if _pool is not None:
        _pool.give()


def run_all(part: str, runs: list[tuple[str, dict]], out: Path, jobs: int) -> list[dict]:
    """Run every ``(name, kwargs)`` of ``part`` not yet done, ``jobs`` at a time; every result, in order."""
    out.mkdir(parents=True, exist_ok=True)
    running: list[tuple[str, Any]] = []
    failed: list[str] = []
    for name, kwargs in runs:
        if (out / f"{name}.json").is_file():
            continue
        while len(running) >= jobs or not _take_core():
            running = _reap(running, failed)
            time.sleep(0.5)
        running.append((name, _start(part, kwargs, out / f"{name}.json", out / f"{name}.log")))
    while running:
        running = _reap(running, failed)
        time.sleep(0.5)
    if failed:
        raise RuntimeError(f"{part}: runs failed, see their logs in {out}: {', '.join(failed)}")
    return [json.loads((out / f"{name}.json").read_text()) for name, _ in runs]


def _start(part: str, kwargs: dict, target: Path, log: Path) -> subprocess.Popen:
    """Start one run in a new interpreter; it writes ``target``, its output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "experiments.protocols.jobs", part, json.dumps(kwargs), str(target)]
    with open(log, "w") as output:  # the child holds its own copy of the descriptor
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)


def cpu_trainer(callbacks=(), validate: bool = False, **stop):
    """The protocols' Lightning trainer: CPU, fp32, gradient clipping 1.0, no logger, checkpoints or progress bar.

    Args:
        callbacks: Trainer callbacks. Default ``()``.
        validate: Run the validation loop (every batch); no sanity check either way. Default ``False``.
        **stop: ``max_epochs`` or ``max_steps``. Default: one epoch.
    """
    import lightning.pytorch as pl

    return pl.Trainer(**(stop or {"max_epochs": 1}), accelerator="cpu", devices=1, precision="32-true",
                      gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
                      callbacks=list(callbacks))


def same_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in ``out/settings.json``; refuse a folder whose cached runs used other settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "settings.json"
    text = json.dumps(settings, indent=1, sort_keys=True)
    if path.is_file() and json.loads(path.read_text()) != json.loads(text):
        raise SystemExit(f"{path}: the runs cached in {out} used other settings; move them away or pass --output")
    path.write_text(text)


def _reap(running, failed):
    still = []
    for name, process in running:
        code = process.poll()
        if code is None:
            still.append((name, process))
            continue
        _give_core()
        if code != 0:
            failed.append(name)
    return still


def main() -> None:
    """A run's process: ``python -m experiments.protocols.jobs <part> <kwargs as JSON> <target>`` in the repository."""
    part, kwargs, target = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    import torch

    torch.set_num_threads(1)
    result = importlib.import_module(f"experiments.protocols.{part}").run_one(**kwargs)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
