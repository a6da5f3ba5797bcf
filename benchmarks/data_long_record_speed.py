"""Time and peak memory of SFTDataModule.setup on a file with one very long record (not a test).

The record is cut before tokenization (``data.encode.character_limit``), so its cost stays that of a record
of ``max_length`` tokens. Each run is its own process (peak RSS is per process); the baseline is the same
file without the long record.

    python -m benchmarks.data_long_record_speed --megabytes 11 --max-length 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ratio

SHORT = [{"prompt": f"Compute {i} + 1.", "completion": f"<think>\n{i}+1={i + 1}\n</think>\nThe answer is {i + 1}."}
         for i in range(20)]


def child(path: str, max_length: int) -> None:
    from lightning_tokens.data.module import SFTDataModule

    started = time.perf_counter()  # one call per process (peak RSS is per process), so not common.timed
    data = SFTDataModule(train_file=path, max_length=max_length, val_fraction=0.0)
    data.setup()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "report": str(data.reports["train"])}))


def run(path: Path, max_length: int) -> dict:
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", str(path), "--max-length", str(max_length)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=11.0, help="size of the long record")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.max_length)
        return
    folder = Path(tempfile.mkdtemp())
    line = "12+34=46\n"
    long = {"prompt": "Compute 12 + 34.",
            "completion": "<think>\n" + line * int(args.megabytes * 1e6 / len(line)) + "</think>\nThe answer is 46."}
    files = {"baseline": SHORT, "with the long record": [long, *SHORT]}
    results = {}
    for name, rows in files.items():
        path = folder / f"{name.replace(' ', '-')}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results[name] = run(path, args.max_length)
    base = results["baseline"]
    for name, result in results.items():
        print(f"{name:22s} setup {result['seconds']:6.2f} s ({ratio(result['seconds'], base['seconds']):>6})  "
              f"peak RSS {result['peak_mib']:7.0f} MiB ({ratio(result['peak_mib'], base['peak_mib']):>5})  "
              f"{result['report']}")


if __name__ == "__main__":
    main()
