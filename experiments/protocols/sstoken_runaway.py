"""Runaway selection in the ssToken evidence runs: when a detector rule would fire, and the plot of the loop.

Reads the per-step ``trace`` of every run JSON of the ssToken part (``experiments/protocols/sstoken.py``). A rule
takes as baseline the mean kept and dropped loss of the first ``window`` steps after the warm-up (the first 20%
of the steps, where ssToken ranks by attention alone), then fires at the first step where the dropped tokens'
loss is at least ``(1 + rise)`` times its baseline while the kept tokens' loss is at most its own: either on the
step's own figures (``point``) or on their mean over the last ``window`` steps (``mean``).

    .venv/bin/python -m experiments.protocols.sstoken_runaway runs/evidence/sstoken     # table + the plot
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Optional

#: ``(window, rise)`` pairs the table reports; ``(8, 0.5)`` is the detector's draft rule.
RULES = ((8, 0.5), (4, 0.5), (8, 0.25), (8, 1.0), (16, 0.5))
#: Share of the steps ssToken ranks by attention alone before REL comes in (``TokenSelection(warmup=0.2)``).
WARMUP = 0.2
#: The runs of the plot: (method, label, colour).
PLOTTED = (("sstoken", "ssToken, lr 1e-3", "tab:red"), ("sstoken@lr3e-4", "ssToken, lr 3e-4", "tab:orange"),
           ("sstoken@lr1e-4", "ssToken, lr 1e-4", "tab:green"), ("rho1", "Rho-1, lr 1e-3", "tab:blue"),
           ("attention", "attention only, lr 1e-3", "tab:gray"))


def first_firing(trace: dict, warmup_steps: int, window: int = 8, rise: float = 0.5,
                 mean: bool = False) -> Optional[int]:
    """The optimizer step at which the rule first fires on ``trace``, or ``None``.

    Args:
        trace: A run's ``trace``: ``step``, ``loss_kept`` and ``loss_dropped`` lists, one entry per step.
        warmup_steps: Steps up to and including this one are the warm-up.
        window: Steps in the baseline (and in the mean of the recent steps with ``mean``). Default ``8``.
        rise: How far above its baseline the dropped loss must be, as a fraction of it. Default ``0.5``.
        mean: Compare the mean of the last ``window`` steps instead of each step's own figures. Default
            ``False``.
    """
    points = [(s, k, d) for s, k, d in zip(trace["step"], trace["loss_kept"], trace["loss_dropped"])
              if s > warmup_steps and k is not None and d is not None]
    if len(points) <= window:
        return None
    base_kept = statistics.mean(k for _, k, _ in points[:window])
    base_dropped = statistics.mean(d for _, _, d in points[:window])
    for i in range(window, len(points)):
        recent = points[i - window + 1:i + 1] if mean else [points[i]]
        kept, dropped = statistics.mean(k for _, k, _ in recent), statistics.mean(d for _, _, d in recent)
        if dropped >= (1 + rise) * base_dropped and kept <= base_kept:
            return points[i][0]
    return None


def load(folder: Path) -> list[dict]:
    """Every run JSON of ``folder`` that has a trace."""
    runs = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json")) if path.name != "settings.json"]
    return [run for run in runs if run.get("trace")]


def warmup_of(run: dict) -> int:
    """The warm-up of the protocol's selection, the same for every row (full SFT included), in steps."""
    return round(WARMUP * run["steps"])


def firing_table(runs: list[dict]) -> str:
    """Markdown: per run, the step each rule of :data:`RULES` first fires at (``point`` / ``mean``), ``–`` never."""
    head = " | ".join(f"w {w}, rise {r:g}" for w, r in RULES)
    lines = [f"| run | held-out loss | {head} |", "|---|---|" + "---|" * len(RULES)]
    for run in sorted(runs, key=lambda r: (r["method"], r["seed"])):
        cells = []
        for window, rise in RULES:
            fired = [first_firing(run["trace"], warmup_of(run), window, rise, mean) for mean in (False, True)]
            cells.append(" / ".join("–" if step is None else str(step) for step in fired))
        lines.append(f"| {run['method']}-{run['seed']} | {run['val_loss']:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, seed: int = 0) -> None:
    """Kept (solid) and dropped (dashed) tokens' current loss per step of the :data:`PLOTTED` runs of ``seed``,
    and the noise tokens' loss beside it, into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    by_name = {(r["method"], r["seed"]): r for r in runs}
    for method, label, colour in PLOTTED:
        run = by_name.get((method, seed))
        if run is None:
            continue
        t = run["trace"]
        for axes, kept, dropped in ((left, "loss_kept", "loss_dropped"), (right, "noise_kept", "noise_dropped")):
            axes.plot(t["step"], _nan(t[kept]), color=colour, label=f"{label}: kept")
            axes.plot(t["step"], _nan(t[dropped]), color=colour, linestyle="--", label=f"{label}: dropped")
    warmup = next((warmup_of(r) for r in runs), None)
    for axes, title in ((left, "response tokens"), (right, "noise tokens (noisy samples)")):
        if warmup:
            axes.axvline(warmup + 0.5, color="black", linewidth=0.8, linestyle=":")
        axes.set_title(f"Runaway selection: current loss of kept and dropped {title}, seed {seed}", fontsize=9)
        axes.set_xlabel("optimizer step (dotted: end of the attention-only warm-up)")
        axes.set_yscale("log")
    left.set_ylabel("mean current loss (nats / token)")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _nan(values: list) -> list[float]:
    return [math.nan if v is None else v for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the ssToken part's runs, e.g. runs/evidence/sstoken")
    parser.add_argument("--plot", type=Path, default=Path("experiments/sstoken_runaway.png"))
    parser.add_argument("--seed", type=int, default=0, help="the seed plotted")
    args = parser.parse_args()
    runs = load(args.folder)
    print(firing_table(runs))
    plot(runs, args.plot, args.seed)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
