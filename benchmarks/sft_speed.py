"""The main job (sft/tiny) end to end: wall time, final held-out exact match, peak memory.

    python -m benchmarks.sft_speed [--config sft/tiny]
"""

from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="sft/tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()  # wall time of one whole CLI run, so not common.timed
        subprocess.run([sys.executable, "-m", "lightning_tokens.cli", "fit", "--config", args.config,
                        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", tmp,
                        "--checkpoint.dirpath", f"{tmp}/checkpoints"], check=True, capture_output=True)
        wall = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows = list(csv.DictReader(next(Path(tmp).rglob("metrics.csv")).open()))
    evals = [r for r in rows if r.get("val/exact_match")]
    last = evals[-1]
    steps = max(int(r["step"]) for r in rows)
    print(f"config {args.config}: {steps + 1} steps, wall {wall:.0f} s, peak RSS {peak_mb:.0f} MiB, "
          f"final val/exact_match {float(last['val/exact_match']):.3f}, val/loss {float(last['val/loss']):.4f}, "
          f"mean thinking length {float(last['val/thinking_length']):.1f} tokens")


if __name__ == "__main__":
    main()
