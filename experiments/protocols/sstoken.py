"""ssToken as its paper ran it: LoRA r=64 on a pretrained base, one epoch over fresh samples, history = base.

Every method trains the same LoRA adapters on the same noisy samples of a seed (same problems, same noise, same
order) and is scored on the same held-out problems by greedy exact match:

- ``sft``: every response token; ``sstoken``: rho 0.6, gamma 0.5, attention only for the first 20% of steps;
- ``loss`` (REL only), ``attention`` (attention only), ``random`` (a random 60% of each response);
- ``rho1``: Rho-1's excess loss against a reference model, the base fine-tuned (LoRA, merged) on clean samples;
- ``base``: no fine-tuning, the base itself on the same held-out problems;
- ``clean``: full SFT on the same problems without noise: what the noise costs (an upper bound for a filter);
- ``clean_sstoken``: ssToken on those clean problems: whether what ssToken does to noisy data needs the noise.

The audit counts, in noisy samples, how many noise tokens and how many clean response tokens each method keeps:
a method that filters noise keeps noise below its 60% budget and clean tokens above it.

Runaway selection (issue 34: REL-ranked selection keeping what the model learns first and dropping for good what
it gets worse at) is measured by the rows of :data:`VARIANTS`: the learning rate
(``sft`` and ``sstoken`` at 1e-4 and 3e-4), an EMA history at decays 0.9, 0.99 and 0.999 (a time constant of
10, 100 and 1,000 steps: after the 64 steps the last two still hold 53% and 94% of the base), a history
refreshed every 16 steps, and 30% of the kept budget drawn at random (``sstoken_variants.py``). Every run
records per optimizer step the mean current loss of the kept and dropped response tokens, the same for noise and
clean tokens of noisy samples, and the share of negative REL (``trace`` in its JSON; ``sstoken_runaway.py``
reads them). Every one of them also runs on the clean problems (``clean_<row>``, as ``clean`` and
``clean_sstoken`` do for full SFT and ssToken at lr 1e-3): the loop does not need the noise, so a setting that
avoids it must avoid it there too.

What runs: ``--seeds`` runs every row (noisy and clean) on the seeds given; the table of the results page is
``--seeds 0 1 2 3 4``. Without ``--seeds`` the part runs what fits the time the part had before the runaway rows
(:data:`DEFAULT_RUNS`): the methods on :data:`METHOD_SEEDS`, the runaway rows and the clean rows that carry the
guidance on :data:`VARIANT_SEEDS`, the three references once.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from experiments.protocols.jobs import cpu_trainer, in_process_step, run_all, same_settings

#: The protocol: one epoch of fresh noisy samples, LoRA r 64, rho 0.6, gamma 0.5, 20% warm-up, history = base.
#: lr 1e-3, not the paper's 1e-4: the paper's epoch is 50k samples, ours 1,024 (64 steps), and at 1e-4 those 64
#: steps left the base where it was (held-out loss 0.1854 -> 0.1840, exact match within a point for every method).
SETTINGS = dict(preset="medium", style="concise", num_train=1024, num_eval=512, task_seed=200, batch_size=16,
                eval_batch_size=128, max_length=512, max_new_tokens=256, lr=1e-3,
                # the same samples per step and the same held-out problems, without the compute spent on padding
                padding_free=True, eval_by_length=True,
                noise=dict(noisy_fraction=0.5, spans=3, span_length=6, digit_rate=0.15))
#: ``--quick``: a smoke run of the pipeline.
QUICK = dict(num_train=32, num_eval=16, max_new_tokens=96)
#: The seeds of the results page (``--seeds 0 1 2 3 4``).
SEEDS = (0, 1, 2, 3, 4)
METHODS = ("sft", "sstoken", "loss", "attention", "random", "rho1")
#: Rows measuring runaway selection: what each changes in the protocol (``mode`` is the method it runs).
VARIANTS = {
    "sft@lr1e-4": dict(mode="sft", lr=1e-4), "sstoken@lr1e-4": dict(mode="sstoken", lr=1e-4),
    "sft@lr3e-4": dict(mode="sft", lr=3e-4), "sstoken@lr3e-4": dict(mode="sstoken", lr=3e-4),
    "sstoken-ema0.9": dict(mode="sstoken", history="ema", ema_decay=0.9),
    "sstoken-ema0.99": dict(mode="sstoken", history="ema", ema_decay=0.99),
    "sstoken-ema0.999": dict(mode="sstoken", history="ema", ema_decay=0.999),
    "sstoken-refresh16": dict(mode="sstoken", refresh=16),
    "sstoken-random30": dict(mode="sstoken", random_share=0.3),
    # the package's fallback: attention-only selection from the step the runaway detector fires
    "sstoken-fallback": dict(mode="sstoken", on_runaway="attention"),
}
#: The clean-problem rows: full SFT (``clean``) and ssToken (``clean_sstoken``) at lr 1e-3, then every
#: :data:`VARIANTS` row on the clean problems (``clean_<row>``).
CLEAN_ROWS = ("clean", "clean_sstoken", *(f"clean_{row}" for row in VARIANTS))
#: Seeds of the methods without ``--seeds``.
METHOD_SEEDS = (0, 1, 2)
#: Seeds of the :data:`VARIANTS` rows and of :data:`DEFAULT_CLEAN` without ``--seeds``.
VARIANT_SEEDS = (0,)
#: The clean rows run without ``--seeds`` (besides ``clean`` and ``clean_sstoken``, which run once as references):
#: ssToken on clean problems at the learning rate the guidance recommends, and with the package's fallback.
DEFAULT_CLEAN = ("clean_sstoken@lr1e-4", "clean_sstoken-fallback")
#: Runs without ``--seeds``: as many as the part had when it ran in 68.8 min (5 seeds of 6 methods, 3 references),
#: every one of the same cost (a LoRA epoch of 64 steps and the 512 held-out problems).
DEFAULT_RUNS = (len(METHODS) * len(METHOD_SEEDS) + (len(VARIANTS) + len(DEFAULT_CLEAN)) * len(VARIANT_SEEDS)
                + 3)
#: The rows of the table: the base itself (no fine-tuning), every method, the runaway rows, the clean rows.
ROWS = ("base", *METHODS, *VARIANTS, *CLEAN_ROWS)
#: Per-step figures of the audit (``trace`` of a run's JSON): mean current loss of the kept and dropped response
#: tokens, of the noise and clean tokens of noisy samples kept and dropped, and the share of negative REL.
TRACE = ("loss_kept", "loss_dropped", "noise_kept", "noise_dropped", "clean_kept", "clean_dropped", "negative_rel")

#: LoRA of the paper (r 64, alpha 16, dropout 0.1, every linear projection).
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}


def task(settings: dict[str, Any], clean: bool = False):
    """The fine-tuning task: fresh training problems (``num_train`` of them, one epoch) and held-out ones."""
    from lightning_tokens import ReasoningTask

    return ReasoningTask.preset(settings["preset"], style=settings["style"], num_train=settings["num_train"],
                                num_val=settings["num_eval"], seed=settings["task_seed"] + (1 if clean else 0))


def module(base: str, settings: dict[str, Any], seed: int, lr: Optional[float] = None):
    from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig

    optimizer = OptimizerConfig(name="adamw", lr=lr or settings["lr"], warmup=0.03, schedule="linear",
                                weight_decay=0.0)
    return CausalLMModule(model=ModelSpec(name_or_path=base, lora=dict(LORA), seed=seed), optimizer=optimizer,
                          max_new_tokens=settings["max_new_tokens"])


def build_reference(base: str, settings: dict[str, Any], out: Path) -> Path:
    """Rho-1's reference: the base fine-tuned with the same LoRA on clean problems (other seed), merged."""
    import lightning.pytorch as pl

    from lightning_tokens import SFTDataModule

    target = out / "reference"
    if (target / "config.json").is_file():
        return target
    pl.seed_everything(0, verbose=False)
    model = module(base, settings, seed=0)
    data = SFTDataModule(task=task(settings, clean=True), max_length=settings["max_length"],
                         batch_size=settings["batch_size"], padding_free=settings["padding_free"], seed=0)
    cpu_trainer().fit(model, datamodule=data)
    model.export(target, merge_lora=True)
    return target


def audit_callback(masks: dict[str, list[bool]], selection=None):
    """A callback counting, over noisy samples, the noise and clean target tokens that keep a weight, and recording
    per optimizer step the mean current loss of kept and dropped tokens (:data:`TRACE`, in ``trace``).

    Args:
        masks: Noise flags of each noisy sample's target tokens, by sample key.
        selection: The :class:`TokenSelection` running before it, whose ``negative_rel`` metric it reads. Default
            ``None``: no negative REL share.
    """
    import math

    import torch

    from lightning_tokens.sstoken.loss_table import row_keys
    from lightning_tokens.token_loss import TokenLossCallback

    class NoiseAudit(TokenLossCallback):
        def __init__(self):
            super().__init__()
            self.counts = dict(noise=0, noise_kept=0, clean=0, clean_kept=0)
            self.trace = {"step": [], **{name: [] for name in TRACE}}
            self.sums = {name: [0.0, 0] for name in TRACE}  # this optimizer step's sum and count of each figure

        def add(self, name, values):
            self.sums[name][0] += float(values.sum())
            self.sums[name][1] += values.numel()

        def reshape_token_loss(self, ctx):
            kept = (ctx.weights > 0).cpu()
            targets = ctx.target_mask.cpu()
            loss = getattr(ctx, "token_loss", None)  # absent from the audit test's stand-in contexts
            loss = None if loss is None else loss.detach().float().cpu()
            if loss is not None:
                self.add("loss_kept", loss[targets & kept])
                self.add("loss_dropped", loss[targets & ~kept])
                negative = getattr(selection, "metrics", {}).get("negative_rel")
                if negative is not None:  # the share over this forward's response tokens
                    n = int(targets.sum())
                    self.sums["negative_rel"][0] += float(negative) * n
                    self.sums["negative_rel"][1] += n
            for row, key, positions in row_keys(ctx.input_ids, ctx.attention_mask, ctx.labels, ctx.segments):
                mask = masks.get(key)
                if mask is None:
                    continue
                sample = targets[row] & torch.as_tensor(positions[1:])  # prediction t targets token t + 1
                for is_noise, keep in zip(mask, kept[row][sample].tolist()):
                    name = "noise" if is_noise else "clean"
                    self.counts[name] += 1
                    self.counts[name + "_kept"] += int(keep)
                if loss is not None:
                    noise, keep = torch.tensor(mask), kept[row][sample]
                    for name, where in (("noise", noise), ("clean", ~noise)):
                        self.add(name + "_kept", loss[row][sample][where & keep])
                        self.add(name + "_dropped", loss[row][sample][where & ~keep])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if trainer.global_step == (self.trace["step"] or [0])[-1]:
                return  # gradients still accumulating: the step goes on
            self.trace["step"].append(trainer.global_step)
            for name, (total, n) in self.sums.items():
                mean = total / n if n else math.nan
                self.trace[name].append(None if math.isnan(mean) else mean)  # JSON has no NaN
            self.sums = {name: [0.0, 0] for name in TRACE}

    torch.set_float32_matmul_precision("high")
    return NoiseAudit()


def is_clean(row: str) -> bool:
    """Whether ``row`` trains on the clean problems (:data:`CLEAN_ROWS`)."""
    return row in CLEAN_ROWS


def row_change(row: str) -> dict[str, Any]:
    """What ``row`` runs: ``mode`` (the method) and what it changes in the protocol (``lr``, ``history``, ...)."""
    noisy = row.removeprefix("clean_")
    if noisy in VARIANTS:
        return dict(VARIANTS[noisy])
    return {"mode": "sft" if noisy in ("base", "clean") else noisy}


def selection_for(method: str, seed: int, reference: Optional[str]):
    """The :class:`TokenSelection` of ``method`` (a method, a :data:`VARIANTS` row or a :data:`CLEAN_ROWS` row),
    or ``None`` for the rows that train on every token."""
    from experiments.protocols.sstoken_variants import RandomShareSelection, RefreshSelection
    from lightning_tokens import ModelSpec
    from lightning_tokens.sstoken import TokenSelection

    change = row_change(method)
    change.pop("lr", None)
    mode = change.pop("mode")
    if mode == "sft":
        return None
    kwargs = dict(mode=mode, seed=seed, reference=ModelSpec(name_or_path=reference) if mode == "rho1" else None)
    # the rows measure the selection itself, whatever the default's fallback, unless the row is the fallback
    kwargs["on_runaway"] = change.pop("on_runaway", "warn")
    if "refresh" in change:
        return RefreshSelection(change.pop("refresh"), **kwargs, **change)
    if "random_share" in change:
        return RandomShareSelection(change.pop("random_share"), **kwargs, **change)
    return TokenSelection(**kwargs, **change)


def run_one(method: str, seed: int, base: str, settings: dict[str, Any], reference: Optional[str] = None) -> dict:
    """Fine-tune ``base`` with ``method`` on the noisy samples of ``seed``; held-out exact match and the audit."""
    import lightning.pytorch as pl

    from experiments.protocols.noise import NoiseSettings, NoisySFTDataModule

    pl.seed_everything(seed, verbose=False)
    model = module(base, settings, seed, lr=row_change(method).get("lr"))
    clean = is_clean(method)
    noise = NoiseSettings(**{**settings["noise"], **({"noisy_fraction": 0.0} if clean else {})})
    data = NoisySFTDataModule(noise=noise, noise_seed=seed,
                              task=task(settings), max_length=settings["max_length"],
                              batch_size=settings["batch_size"], eval_batch_size=settings["eval_batch_size"],
                              padding_free=settings["padding_free"], eval_by_length=settings["eval_by_length"],
                              seed=seed)
    data.tokenizer = model.tokenizer
    data.setup("fit")
    selection = selection_for(method, seed, reference)
    audit = audit_callback(data.noise_masks, selection)
    callbacks = [] if selection is None else [selection]
    run = cpu_trainer([*callbacks, audit], validate=True)
    started = time.time()
    if method == "base":
        run.validate(model, datamodule=data, verbose=False)
    else:
        run.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in run.callback_metrics.items()}
    c = audit.counts
    return dict(method=method, seed=seed, steps=run.global_step, seconds=time.time() - started,
                exact_match=metrics["val/exact_match"], val_loss=metrics["val/loss"],
                kept_noise=c["noise_kept"] / max(1, c["noise"]), kept_clean=c["clean_kept"] / max(1, c["clean"]),
                noise_tokens=c["noise"], clean_tokens=c["clean"],
                warmup_steps=getattr(selection, "warmup_steps", 0), trace=audit.trace)


def run_part(base: Path, out: Path, jobs: int, quick: bool, seeds: Optional[list[int]] = None) -> str:
    """The part's runs (``jobs`` side by side, cached in ``out``); the markdown table of every run there is.

    Args:
        base: The pretrained base (a ``save_pretrained`` folder).
        out: Folder of the cached runs, the reference model and ``settings.json``.
        jobs: Runs side by side, one thread each.
        quick: Smoke-run sizes (:data:`QUICK`); the methods on two seeds.
        seeds: Seeds to run every row on, noisy and clean (:data:`SEEDS` for the results page). Default ``None``:
            :func:`planned_runs` without seeds, :data:`DEFAULT_RUNS` runs.
    """
    settings = {**SETTINGS, **(QUICK if quick else {})}
    same_settings(out, {"base": str(base), **settings})
    with in_process_step():
        reference = build_reference(str(base), settings, out)
    runs = [(f"{row}-{seed}", dict(method=row, seed=seed, base=str(base), settings=settings,
                                   reference=str(reference) if row == "rho1" else None))
            for row, seed in planned_runs(seeds, quick)]
    run_all("sstoken", runs, out, jobs)
    return table(load_results(out))


def planned_runs(seeds: Optional[list[int]] = None, quick: bool = False) -> list[tuple[str, int]]:
    """``(row, seed)`` of every run, in the order they start.

    With ``seeds``, every row of :data:`ROWS` on each of them (the base once), a seed's noisy rows together before
    the next seed's, then the clean rows the same way. Without, the methods on :data:`METHOD_SEEDS` (two with
    ``quick``), the :data:`VARIANTS` rows and :data:`DEFAULT_CLEAN` on :data:`VARIANT_SEEDS`, and the references
    (``clean``, ``clean_sstoken``, ``base``) on seed 0. The base, the shortest run, goes last: on 2 cores the last
    run leaves one core idle.

    Args:
        seeds: Seeds of every row. Default ``None``: the default plan above.
        quick: Two seeds for the methods in the default plan. Default ``False``.
    """
    if seeds is not None:
        noisy = [(row, seed) for seed in seeds for row in (*METHODS, *VARIANTS)]
        clean = [(row, seed) for seed in seeds for row in CLEAN_ROWS]
        return noisy + clean + [("base", 0)]
    method_seeds = METHOD_SEEDS[:2] if quick else METHOD_SEEDS
    return ([(row, seed) for seed in method_seeds for row in METHODS]
            + [(row, seed) for seed in VARIANT_SEEDS for row in (*VARIANTS, *DEFAULT_CLEAN)]
            + [("clean_sstoken", 0), ("clean", 0), ("base", 0)])


def load_results(out: Path) -> list[dict]:
    """Every finished run in ``out``: the table shows all there are, from any earlier ``--seeds``."""
    return [json.loads(path.read_text()) for path in sorted(out.glob("*-*.json"))]


#: What each row of the table is, in words (a clean row is its noisy row's words on the clean problems).
LABELS = {"base": "base (no fine-tuning)", "sft": "full SFT", "sstoken": "ssToken", "loss": "loss only (REL)",
          "attention": "attention only", "random": "random 60%", "rho1": "Rho-1", "clean": "full SFT",
          "clean_sstoken": "ssToken", "sft@lr1e-4": "full SFT, lr 1e-4", "sstoken@lr1e-4": "ssToken, lr 1e-4",
          "sft@lr3e-4": "full SFT, lr 3e-4", "sstoken@lr3e-4": "ssToken, lr 3e-4",
          "sstoken-ema0.9": "ssToken, EMA history 0.9", "sstoken-ema0.99": "ssToken, EMA history 0.99",
          "sstoken-ema0.999": "ssToken, EMA history 0.999",
          "sstoken-refresh16": "ssToken, history refreshed every 16 steps",
          "sstoken-random30": "ssToken, 30% of the budget at random",
          "sstoken-fallback": "ssToken, `on_runaway=\"attention\"`"}


def label(row: str) -> str:
    """The words of ``row`` (:data:`LABELS`)."""
    return LABELS.get(row) or LABELS[row.removeprefix("clean_")]


def table(results: list[dict]) -> str:
    """Markdown, two tables: on the noisy problems, exact match and held-out loss (mean, spread, per seed) and the
    kept rates of noise and clean tokens per row; on the clean problems, exact match and held-out loss."""
    noisy = ["| row | setting | exact match % (mean ± sd) | per seed | held-out loss (mean ± sd) "
             "| kept noise / kept clean tokens (noisy samples) |", "|---|---|---|---|---|---|"]
    clean = ["| row | setting, on the clean problems | exact match % (mean ± sd) | per seed "
             "| held-out loss (mean ± sd) |", "|---|---|---|---|---|"]
    for method in ROWS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        em = [100 * r["exact_match"] for r in rows]
        cells = (f"| {method} | {label(method)} | {_spread(em, 1)} | {', '.join(f'{e:.1f}' for e in em)} "
                 f"| {_spread([r['val_loss'] for r in rows], 3)} |")
        if is_clean(method):
            clean.append(cells)
            continue
        kn, kc = (statistics.mean(r[k] for r in rows) for k in ("kept_noise", "kept_clean"))
        noisy.append(cells + (" – |" if method in ("base", "sft") or method.startswith("sft@") else
                              f" {kn:.2f} / {kc:.2f} |"))
    return "\n".join(noisy + ([""] + clean if len(clean) > 2 else []))


def _spread(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"
