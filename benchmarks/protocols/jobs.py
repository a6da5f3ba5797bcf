"""Run an experiment's independent runs side by side, one process and one thread each, results as JSON files.

A run is ``(part, name, kwargs)``: ``protocols.<part>.run_one(**kwargs)`` returns a dict that lands in
``<out>/<name>.json``. A run whose JSON exists is not run again, so an interrupted experiment resumes where it
stopped; its log is ``<out>/<name>.log``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_all(part: str, runs: list[tuple[str, dict]], out: Path, jobs: int) -> list[dict]:
    """Run every ``(name, kwargs)`` of ``part`` not yet done, ``jobs`` at a time; every result, in order."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    for name, kwargs in runs:
        if (out / f"{name}.json").is_file():
            continue
        while len(running) >= jobs:
            running = _reap(running, failed)
            time.sleep(0.5)
        command = [sys.executable, "-m", "protocols.jobs", part, json.dumps(kwargs), str(out / f"{name}.json")]
        log = open(out / f"{name}.log", "w")
        running.append((name, subprocess.Popen(command, env=env, cwd=HERE.parent.parent, stdout=log,
                                                stderr=subprocess.STDOUT)))
    while running:
        running = _reap(running, failed)
        time.sleep(0.5)
    if failed:
        raise RuntimeError(f"{part}: runs failed, see their logs in {out}: {', '.join(failed)}")
    return [json.loads((out / f"{name}.json").read_text()) for name, _ in runs]


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
        elif code != 0:
            failed.append(name)
    return still


def main() -> None:
    part, kwargs, target = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    import torch

    torch.set_num_threads(1)
    result = importlib.import_module(f"protocols.{part}").run_one(**kwargs)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, target)


if __name__ == "__main__":
    main()
