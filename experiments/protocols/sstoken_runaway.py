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
import math
import re
import statistics
from pathlib import Path
from typing import Optional

from experiments.protocols.sstoken import load_results

#: ``(window, rise)`` pairs the table reports; ``(8, 0.5)`` is the detector's draft rule.
RULES = ((8, 0.5), (4, 0.5), (8, 0.25), (8, 1.0), (16, 0.5))
#: Share of the steps ssToken ranks by attention alone before REL comes in (``TokenSelection(warmup=0.2)``).
WARMUP = 0.2
#: The runs of the plot: (method, label, colour).
PLOTTED = (("sstoken", "ssToken, lr 1e-3", "tab:red"), ("sstoken@lr1e-4", "ssToken, lr 1e-4", "tab:green"),
           ("rho1", "Rho-1, lr 1e-3", "tab:blue"), ("attention", "attention only, lr 1e-3", "tab:gray"))
#: The runs of the negative-REL panel.
NEGATIVE = (("sstoken", "ssToken, lr 1e-3", "tab:red"), ("sstoken@lr3e-4", "ssToken, lr 3e-4", "tab:orange"),
            ("sstoken@lr1e-4", "ssToken, lr 1e-4", "tab:green"), ("sstoken-ema0.9", "EMA 0.9", "tab:purple"),
            ("sstoken-refresh16", "refreshed every 16", "tab:brown"),
            ("clean_sstoken", "ssToken on clean problems, lr 1e-3", "tab:pink"))
#: Steps in the moving mean of the plotted curves.
SMOOTH = 5


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
    """Every run JSON of ``folder`` that has a trace, with ``detector``: the step at which the package's detector
    warned in the run's log (``None``: it never did, or there is no log)."""
    runs = [run for run in load_results(folder) if run.get("trace")]
    for run in runs:
        log = folder / f"{run['method']}-{run['seed']}.log"
        run["detector"] = detector_step(log.read_text()) if log.is_file() else None
    return runs


def detector_step(log: str) -> Optional[int]:
    """The step of the first ``Runaway selection at step N`` warning of :class:`TokenSelection` in ``log``."""
    found = re.search(r"Runaway selection at step (\d+)", log)
    return int(found.group(1)) if found else None


def warmup_of(run: dict) -> int:
    """The warm-up of the protocol's selection, the same for every row (full SFT included), in steps."""
    return round(WARMUP * run["steps"])


def firing_table(runs: list[dict]) -> str:
    """Markdown: per run, the step the package's detector warned at and the step each rule of :data:`RULES` first
    fires at (``point`` / ``mean``), ``–`` never."""
    head = " | ".join(f"w {w}, rise {r:g}" for w, r in RULES)
    lines = [f"| run | held-out loss | package's detector | {head} |", "|---|---|---|" + "---|" * len(RULES)]
    for run in sorted(runs, key=lambda r: (r["method"], r["seed"])):
        cells = []
        for window, rise in RULES:
            fired = [first_firing(run["trace"], warmup_of(run), window, rise, mean) for mean in (False, True)]
            cells.append(" / ".join("–" if step is None else str(step) for step in fired))
        warned = "–" if run.get("detector") is None else str(run["detector"])
        lines.append(f"| {run['method']}-{run['seed']} | {run['val_loss']:.3f} | {warned} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, seeds: Optional[list[int]] = None) -> None:
    """Kept (solid) and dropped (dashed) tokens' current loss per step of the :data:`PLOTTED` runs, over the
    response tokens and over the clean tokens of noisy samples, and the share of negative REL of the
    :data:`NEGATIVE` runs; each curve the mean over ``seeds`` (default: every seed there is), then a moving mean
    of :data:`SMOOTH` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
    for axes, kept, dropped in ((panels[0], "loss_kept", "loss_dropped"), (panels[1], "clean_kept", "clean_dropped")):
        for method, label, colour in PLOTTED:
            steps, curves = _mean_over_seeds(runs, method, (kept, dropped), seeds)
            if steps:
                axes.plot(steps, curves[0], color=colour, label=f"{label}: kept")
                axes.plot(steps, curves[1], color=colour, linestyle="--", label=f"{label}: dropped")
    for method, label, colour in NEGATIVE:
        steps, curves = _mean_over_seeds(runs, method, ("negative_rel",), seeds)
        if steps:
            panels[2].plot(steps, curves[0], color=colour, label=label)
    warmup = next((warmup_of(r) for r in runs), None)
    titles = ("all response tokens (the detector's figures)", "clean tokens of noisy samples",
              "share of response tokens with negative REL")
    for axes, title in zip(panels, titles):
        if warmup:
            axes.axvline(warmup + 0.5, color="black", linewidth=0.8, linestyle=":")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("optimizer step (dotted: end of the attention-only warm-up)", fontsize=8)
        axes.legend(fontsize=7)
    panels[0].set_ylabel("mean current loss of kept / dropped tokens (nats)")
    used = sorted({r["seed"] for r in runs if seeds is None or r["seed"] in seeds})
    fig.suptitle(f"Runaway selection: kept and dropped tokens' loss over training (mean of seeds "
                 f"{', '.join(map(str, used))}, moving mean of {SMOOTH} steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _mean_over_seeds(runs, method, names, seeds):
    """Steps and, per name of ``names``, the per-step mean over the seeds of ``method``, smoothed."""
    chosen = [r["trace"] for r in runs if r["method"] == method and (seeds is None or r["seed"] in seeds)]
    if not chosen:
        return [], []
    steps = chosen[0]["step"]
    curves = []
    for name in names:
        values = [[math.nan if v is None else v for v in trace[name]] for trace in chosen]
        mean = [statistics.mean(column) for column in zip(*values)]
        curves.append([_window_mean(mean[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(mean))])
    return steps, curves


def _window_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.mean(finite) if finite else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the ssToken part's runs, e.g. runs/evidence/sstoken")
    parser.add_argument("--plot", type=Path, default=Path("experiments/sstoken_runaway.png"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="the seeds plotted (default: all)")
    args = parser.parse_args()
    runs = load(args.folder)
    print(firing_table(runs))
    plot(runs, args.plot, args.seeds)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
