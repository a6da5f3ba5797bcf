"""One ssToken evidence run, padded against lean: wall time of its training and of its validation, and its results.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/padding_free_speed.py --method sft --seed 0

``padded`` is the run as the evidence protocol had it before: training batches padded to their longest sample,
held-out batches in the task's order. ``lean`` is the same run with ``SFTDataModule(padding_free=True,
eval_by_length=True)``: the same samples in every step and the same held-out problems, without the compute spent
on padding. The two run one after the other in this process's interpreter (one thread), so their ratio is the
figure; exact match, held-out loss and the noise audit show that what they learn matches up to LoRA dropout's
random masks, which fall on other positions once the layout changes.

Needs the evidence base (``evidence.py base``); ``--method rho1`` also the Rho-1 reference that ``evidence.py
sstoken`` builds.
"""

from __future__ import annotations

import argparse
import json

from experiments.base import ROOT, BaseSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sft", help="an ssToken evidence method (sft, sstoken, rho1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="runs/evidence/sstoken/reference", help="Rho-1's reference model")
    args = parser.parse_args()

    import torch
    from lightning.pytorch.callbacks import Timer

    from experiments.protocols import jobs, sstoken

    torch.set_num_threads(1)
    base = ROOT / BaseSettings().resolved().key() / "model"
    if not base.is_dir():
        raise SystemExit(f"{base}: no evidence base; build it with python -m experiments.evidence base")
    trainer = jobs.cpu_trainer
    for layout in ("padded", "lean"):
        clock = Timer()  # one validation, at the end of the epoch, inside the fit's training stage
        sstoken.cpu_trainer = lambda callbacks=(), **kwargs: trainer([*callbacks, clock], **kwargs)
        lean = layout == "lean"
        settings = {**sstoken.SETTINGS, "padding_free": lean, "eval_by_length": lean}
        result = sstoken.run_one(args.method, args.seed, str(base), settings, reference=args.reference)
        validation = clock.time_elapsed("validate")
        print(json.dumps({"layout": layout, "train_seconds": round(clock.time_elapsed("train") - validation, 1),
                          "validation_seconds": round(validation, 1), **result}), flush=True)


if __name__ == "__main__":
    main()
