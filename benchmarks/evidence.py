"""Evidence under the papers' own protocols: one pretrained embedded base, then each method as its paper ran it.

Every part is runnable alone; results are cached under ``runs/evidence/<part>/`` (one JSON per run), so an
interrupted part resumes, and each part prints its markdown table and writes it to ``table.md``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/evidence.py base            # the base (cached), its exact match
    .venv/bin/python benchmarks/evidence.py sstoken --jobs 2                   # ssToken and its baselines
    .venv/bin/python benchmarks/evidence.py caft --jobs 2 --seeds 0            # one part, one seed
    .venv/bin/python benchmarks/evidence.py all --jobs 2                       # every part, in order

Parts: ``base`` (``benchmarks/pretrained_base.py``, built once and cached: every other part starts from it), then
``sstoken``, ``caft``, ``quiet_star`` and ``budget``, each ``benchmarks/protocols/<part>.py``, whose docstring
states its protocol and the reasons for every choice. ``--quick`` shrinks every part (and the base) to a smoke
run with a separate cache: it checks the pipeline, not the methods.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pretrained_base import BaseSettings, EvalSettings, build_base  # noqa: E402

#: The parts after the base, in the order ``all`` runs them: ``protocols.<part>.run_part`` each.
PARTS = ("sstoken", "caft", "quiet_star", "budget")


def base_part(args) -> Path:
    settings = BaseSettings(steps=30) if args.quick else BaseSettings()
    evaluation = EvalSettings(problems=16) if args.quick else EvalSettings()
    return build_base(settings, evaluation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["base", *PARTS, "all"])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--output", default="runs/evidence")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: each part's)")
    args = parser.parse_args()
    started = time.time()
    base = base_part(args)
    for part in PARTS if args.part == "all" else [args.part] if args.part in PARTS else []:
        part_started = time.time()
        out = Path(args.output) / (f"{part}-quick" if args.quick else part)
        table = importlib.import_module(f"protocols.{part}").run_part(base, out, args.jobs, args.quick, args.seeds)
        (out / "table.md").write_text(table + "\n")
        print(f"## {part} ({(time.time() - part_started) / 60:.1f} min)\n\n{table}\n", flush=True)
    print(f"evidence: {args.part} in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
