"""Evidence under the papers' own protocols: one pretrained embedded base, then each method as its paper ran it.

Every part is runnable alone; results are cached under ``runs/evidence/<part>/`` (one JSON per run), so an
interrupted part resumes, and each part prints its markdown table and writes it to ``table.md``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/evidence.py base            # the base (cached), its exact match
    .venv/bin/python benchmarks/evidence.py sstoken --jobs 2                   # ssToken and its baselines
    .venv/bin/python benchmarks/evidence.py all --jobs 2                       # every part, in order

Parts: ``base`` (``benchmarks/pretrained_base.py``), ``sstoken`` (``benchmarks/protocols/sstoken.py``).
``--quick`` shrinks every part to a smoke run (a separate cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pretrained_base import BaseSettings, EvalSettings, build_base  # noqa: E402
from protocols import sstoken  # noqa: E402
from protocols.jobs import run_all  # noqa: E402

#: ssToken protocol: one epoch of fresh noisy samples, LoRA r 64, rho 0.6, gamma 0.5, 20% warm-up, history = base.
SSTOKEN = dict(preset="medium", style="concise", num_train=1024, num_eval=512, task_seed=200, batch_size=16,
               eval_batch_size=128, max_length=512, max_new_tokens=256, lr=1e-4,
               noise=dict(noisy_fraction=0.5, spans=3, span_length=6, digit_rate=0.15))
SEEDS = (0, 1, 2, 3, 4)
QUICK = dict(num_train=32, num_eval=16, max_new_tokens=96)


def base_part(args) -> Path:
    settings = BaseSettings(steps=30) if args.quick else BaseSettings()
    evaluation = EvalSettings(problems=16) if args.quick else EvalSettings()
    return build_base(settings, evaluation)


def sstoken_part(args, base: Path) -> str:
    settings = {**SSTOKEN, **(QUICK if args.quick else {})}
    out = Path(args.output) / ("sstoken-quick" if args.quick else "sstoken")
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps({"base": str(base), **settings}, indent=1))
    reference = sstoken.build_reference(str(base), settings, out)
    seeds = args.seeds if args.seeds is not None else (SEEDS[:2] if args.quick else SEEDS)
    runs = [(f"{method}-{seed}", dict(method=method, seed=seed, base=str(base), settings=settings,
                                      reference=str(reference)))
            for seed in seeds for method in sstoken.METHODS]
    runs.insert(0, ("base-0", dict(method="base", seed=0, base=str(base), settings=settings, reference=None)))
    results = run_all("sstoken", runs, out, args.jobs)
    return sstoken.table(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["base", "sstoken", "all"])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--output", default="runs/evidence")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: 0 1 2 3 4)")
    args = parser.parse_args()
    started = time.time()
    base = base_part(args)
    tables = {}
    if args.part in ("sstoken", "all"):
        tables["sstoken"] = sstoken_part(args, base)
    for part, table in tables.items():
        target = Path(args.output) / (f"{part}-quick" if args.quick else part) / "table.md"
        target.write_text(table + "\n")
        print(f"## {part}\n\n{table}\n")
    print(f"evidence: {args.part} in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
