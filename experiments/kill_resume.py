"""Exact resume under ``kill -9``: a CLI run killed right after its step-K checkpoint and resumed from it, against
an uninterrupted run of the same config (validation off, a checkpoint and a logged loss at every step).

    python -m experiments.kill_resume NAME CONFIG KILL_STEP [extra lightning-tokens fit options ...]
    python -m experiments.kill_resume caft caft/heads-tiny 10 --data.init_args.task.num_train 256 \
        --data.init_args.task.num_val 8 --model.init_args.heads_path /tmp/kill_resume/caft-heads

Prints the largest per-step ``train/loss`` difference from step K on and the largest difference of any tensor of
the two runs' final checkpoints (runs under ``/tmp/kill_resume/NAME``).
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path("/tmp/kill_resume")


def command(root: Path, config: str, extra: list[str], run: str, ckpt=None) -> list[str]:
    out = root / run
    args = [sys.executable, "-m", "lightning_tokens.cli", "fit", "--config", config,
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
            "--checkpoint.dirpath", str(out / "ckpt"), "--checkpoint.every_n_train_steps", "1",
            "--checkpoint.save_top_k", "-1", "--checkpoint.filename", "{step}", *extra]
    if ckpt:
        args += ["--ckpt_path", str(ckpt)]
    return args


def losses(root: Path, run: str) -> dict[int, float]:
    found = {}
    for path in sorted((root / run).rglob("metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("train/loss"):
                found[int(row["step"])] = float(row["train/loss"])
    return found


def final_state(root: Path, run: str) -> tuple[dict, str]:
    last = max((root / run / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    return torch.load(last, map_location="cpu", weights_only=False)["state_dict"], last.name


def main() -> None:
    name, config, kill_step, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    root = ROOT / name
    quiet = dict(env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(command(root, config, extra, "whole"), check=True, **quiet)
    victim = subprocess.Popen(command(root, config, extra, "killed"), **quiet)
    target = root / "killed" / "ckpt" / f"step={kill_step}.ckpt"
    while not target.exists() and victim.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let the save finish
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    subprocess.run(command(root, config, extra, "killed", target), check=True, **quiet)
    whole, resumed = losses(root, "whole"), losses(root, "killed")
    after = [s for s in whole if s >= kill_step]
    loss_gap = max(abs(whole[s] - resumed[s]) for s in after)
    (a, name_a), (b, name_b) = final_state(root, "whole"), final_state(root, "killed")
    weight_gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    print(f"{name}: killed after {target.name}, final {name_a} / {name_b}, {len(after)} steps compared, "
          f"max loss gap {loss_gap:.3g}, max weight gap {weight_gap:.3g} over {len(a)} tensors")


if __name__ == "__main__":
    main()
