"""Evidence under the papers' own protocols: one pretrained embedded base, then each method as its paper ran it.

Every part is runnable alone; results are cached under ``runs/evidence/<part>/`` (one JSON per run), so an
interrupted part resumes, and each part prints its markdown table and writes it to ``table.md``.

    OMP_NUM_THREADS=2 .venv/bin/python -m experiments.evidence base          # the base (cached), its exact match
    .venv/bin/python -m experiments.evidence sstoken --jobs 2                 # ssToken and its baselines
    .venv/bin/python -m experiments.evidence sstoken --jobs 2 --seeds 0 1 2 3 4 --base-threads 1   # its table
    .venv/bin/python -m experiments.evidence caft --jobs 2 --seeds 0          # one part, one seed
    .venv/bin/python -m experiments.evidence all --jobs 2                     # the base, then every part

Run from the repository root. Parts: ``base`` (``experiments/base.py``, built once and cached: every other part
starts from it), then ``sstoken``, ``caft``, ``quiet_star`` and ``budget``, each ``experiments/protocols/<part>.py``,
whose docstring states its protocol and the reasons for every choice. ``all`` builds the base, then runs the four
parts side by side over one pool of ``--jobs`` cores (``experiments.protocols.jobs.share_cores``), so no core
idles while a part waits on a sequential stage; each part prints its table as it finishes. ``--quick`` shrinks every
part (and the base) to a smoke run with a separate cache: it checks the pipeline, not the methods.
``--base-threads`` is the thread count the base trains on (``BaseSettings.threads``): its weights depend on it,
and the ssToken table ran on a base built on 1 thread, the other parts on 2.
"""

from __future__ import annotations

import argparse
import importlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments.base import BaseSettings, EvalSettings, build_base

#: The parts after the base: ``experiments.protocols.<part>.run_part`` each.
PARTS = ("sstoken", "caft", "quiet_star", "budget")
#: The order ``all`` starts them in: the longest chain of sequential stages first, so it queues for cores first.
START_ORDER = ("budget", "caft", "quiet_star", "sstoken")


def base_part(args) -> Path:
    settings = BaseSettings(threads=args.base_threads, **({"steps": 30} if args.quick else {}))
    evaluation = EvalSettings(problems=16) if args.quick else EvalSettings()
    return build_base(settings, evaluation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["base", *PARTS, "all"])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--output", default="runs/evidence")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: each part's)")
    parser.add_argument("--base-threads", type=int, default=BaseSettings.threads,
                        help="torch threads the base trains on (its weights depend on it; ssToken's table: 1)")
    args = parser.parse_args()
    started = time.time()
    base = base_part(args)
    parts = START_ORDER if args.part == "all" else [args.part] if args.part in PARTS else []
    if len(parts) > 1:
        from experiments.protocols.jobs import share_cores

        share_cores(args.jobs)
    with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:
        running = [pool.submit(run_one_part, part, base, args) for part in parts]
        for future in running:
            future.result()  # re-raises a part's failure
    print(f"evidence: {args.part} in {(time.time() - started) / 60:.1f} min")


def run_one_part(part: str, base: Path, args) -> None:
    """Run ``part`` from ``base`` (cached under ``--output``), write its ``table.md`` and print it."""
    started = time.time()
    out = Path(args.output) / (f"{part}-quick" if args.quick else part)
    protocol = importlib.import_module(f"experiments.protocols.{part}")
    table = protocol.run_part(base, out, args.jobs, args.quick, args.seeds)
    (out / "table.md").write_text(table + "\n")
    print(f"## {part} ({(time.time() - started) / 60:.1f} min)\n\n{table}\n", flush=True)


if __name__ == "__main__":
    main()
