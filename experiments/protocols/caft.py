"""CAFT as its paper ran it: heads pre-trained on the base's own answers, then fine-tuning on a new style.

Stage 1 (once, shared by every seed): the pretrained base answers fresh ``easy`` and ``medium`` prompts (task
seed 301) itself, greedily, in its own format (self-distillation, as the paper's stage 1 does); CAFT's default
heads (K = 4 copies of the last decoder layer, shared final norm and ``lm_head``) train on those answers with
the base frozen, loss ``sum_k 0.8^k CE_k`` (``MultiTokenHeadsModule``). Reported: each head's top-1 accuracy
on held-out distilled answers.

Stage 2 (per seed, two runs): full fine-tuning (not the paper's LoRA r 8: see below), one epoch over 1,024
fresh ``easy`` problems (task seed 300; 128 steps of 8) written in the ``words`` style (operators spelled out:
``7 plus 8 is 15``; the tokenizer spells ``plus`` and ``minus`` letter by letter, so they are multi-token
concepts), which the base never saw; same problems, order, dropout and steps in both runs of a seed:

- ``ntp``: plain next-token loss;
- ``caft``: ``ConceptAwareFineTuning`` with the paper's defaults: beta 0.01, gamma 0.8, rsine schedule, the
  stage-1 heads frozen (their gradient still reaches the model);
- ``base``: no fine-tuning, the base itself on the same held-out problems.

Scored on the same 512 held-out ``words`` problems: greedy exact match of the final answer, the share of
answers whose thinking is written in the new style (``in words``: did fine-tuning move the base at all?), and
CE_0, the plain next-token loss on the reference ``words`` answers (teacher-forced, so it measures how well
the new style was learned, answer or not). CAFT runs also record their heads' top-1 accuracy on the new style
at the first and last step.

Choices and why:

- ``easy`` for stage 2: the prompt does not depend on the style, so exact match is a question of arithmetic,
  not of format; the base scores about 35% on ``easy`` and 5% on ``medium``, so ``easy`` leaves room both
  ways, and its answers (about 68 tokens in words) are short enough for 512 held-out generations per run.
- Exact match alone cannot tell whether the style was learned (the base can answer right in its own
  format); the style share and CE_0 can.
- Full fine-tuning, AdamW 1e-3, batch 8, cosine with 5% warm-up (paper: LoRA r 8, 1e-5, batch 32, cosine,
  50 warm-up steps, 5 epochs, on Llama-3.1-8B; its full fine-tuning runs are the paper's other setting). LoRA
  r 8 could not move this 2.5M-weight base to the new style within the budget: one epoch of 768 problems
  (seed 0, 128 held-out) left CE_0 at 3.11 (lr 1e-3), 1.82 (3e-3) and 1.45 (1e-2, and 3e-3 at batch 8), its
  answers garbled (``1 mss 5 is 5``) and exact match 1-3%; full fine-tuning at 1e-3, batch 8, reached CE_0
  0.32 with every answer in words (0.15 with 1,280 problems), 3e-4 only 0.91. The heads are frozen as in the
  paper; the ``lm_head`` is tied to the embeddings here, so it trains (``freeze_lm_head`` would not apply).
- After one epoch exact match is far below the base's (about 5%): the base's arithmetic was learned in its
  own notation, and the new one must be learned again; CE_0 is the score that tells the methods apart here.
- Stage 1 uses AdamW 1e-3 (paper: 8-bit AdamW 1e-4, 300 warm-up steps, 5 epochs with early stopping): far
  fewer steps here, and bitsandbytes has no CPU kernels; 3 epochs with 5% warm-up and cosine.
- The stage-2 training set is sized so the whole part fits about 14 minutes on 2 cores (1,024 problems, 128
  steps of 8); the paper trains for 5 epochs on thousands of samples. Stage 1 runs beside the base's score and
  the next-token runs (they need no heads); the CAFT runs follow.
- A difference is called inside the seed spread when a paired t-test over seeds (CAFT minus next-token, same
  seed) does not reach two-sided 95%.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from experiments.protocols.jobs import cpu_trainer, run_all, same_settings

METHODS = ("ntp", "caft")
#: The table's rows: the base itself, then each fine-tuning.
ROWS = ("base", *METHODS)
NAMES = {"base": "base (no fine-tuning)", "ntp": "next-token", "caft": "CAFT"}
#: LoRA of the paper's stage 2 (r 8, alpha 16, dropout 0.1, every linear projection).
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
#: The paper's stage-2 defaults.
CAFT = dict(beta=0.01, gamma=0.8, schedule="rsine", train_heads=False)

SETTINGS: dict[str, Any] = dict(
    preset="easy", style="words", num_train=1024, num_eval=512, task_seed=300, batch_size=8, eval_batch_size=128,
    max_length=512, max_new_tokens=160, lr=1e-3, warmup=0.05, lora=None, padding_free=True,
    stage1=dict(prompts={"easy": 768, "medium": 256}, task_seed=301, max_new_tokens=256, epochs=3, batch_size=16,
                lr=1e-3, warmup=0.05, val_fraction=0.1, num_heads=4, gamma=0.8),
)
#: A smoke run: the pipeline, not the method.
QUICK: dict[str, Any] = dict(
    num_train=32, num_eval=16, max_new_tokens=96,
    stage1=dict(SETTINGS["stage1"], prompts={"easy": 40, "medium": 8}, epochs=1, max_new_tokens=128),
)
SEEDS = (0, 1, 2, 3, 4)
#: Two-sided 95% critical values of Student's t by degrees of freedom (larger: 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def task(settings: dict[str, Any]):
    """Stage 2's task: ``num_train`` fresh problems in the new style (one epoch) and ``num_eval`` held-out ones."""
    from lightning_tokens import ReasoningTask

    return ReasoningTask.preset(settings["preset"], style=settings["style"], num_train=settings["num_train"],
                                num_val=settings["num_eval"], seed=settings["task_seed"])


def in_words(completion: str) -> bool:
    """Whether a completion's thinking is written in the ``words`` style: operators spelled out, so no ``+``
    or ``=`` sign, and at least one ``is``. False when there is no ``<think> ... </think>`` block.

    Args:
        completion: A generated response.
    """
    from lightning_tokens.data.reasoning_task import THINK_END, THINK_START

    if THINK_START not in completion or THINK_END not in completion.split(THINK_START, 1)[1]:
        return False
    thinking = completion.split(THINK_START, 1)[1].split(THINK_END, 1)[0]
    return "+" not in thinking and "=" not in thinking and " is " in thinking


def paired(caft: list[float], ntp: list[float]) -> dict[str, float | bool]:
    """Paired comparison over seeds: mean and sd of ``caft[i] - ntp[i]``, the t statistic, and whether the
    difference is inside the seed spread (two-sided 95% paired t-test not reached).

    Args:
        caft: One score per seed for CAFT.
        ntp: The same seeds' scores for next-token fine-tuning, in the same order.
    """
    if len(caft) != len(ntp) or len(caft) < 2:
        raise ValueError("paired: need the same seeds for both methods, at least two")
    diffs = [c - n for c, n in zip(caft, ntp)]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(len(diffs))) if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    df = len(diffs) - 1
    critical = T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96
    return dict(mean=mean, sd=sd, t=t, inside=abs(t) < critical)


def build_heads(base: str, settings: dict[str, Any], out: Path) -> dict:
    """Stage 1: self-distil the base's answers (``out/distilled.jsonl``), train the heads on them with the base
    frozen, write them to ``out/heads`` (atomically: through ``out/heads.tmp``); held-out top-1 accuracy per head.

    Args:
        base: Directory of the pretrained base.
        settings: The part's settings; reads ``settings["stage1"]``.
        out: The part's output directory.
    """
    import lightning.pytorch as pl

    from lightning_tokens import OptimizerConfig, ReasoningTask, SFTDataModule
    from lightning_tokens.caft import MultiTokenHeadsModule, self_distill
    from lightning_tokens.modeling import ModelSpec

    s1 = settings["stage1"]
    target, tmp = out / "heads", out / "heads.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    optimizer = OptimizerConfig(name="adamw", lr=s1["lr"], warmup=s1["warmup"], schedule="cosine")
    module = MultiTokenHeadsModule(ModelSpec(name_or_path=base), num_heads=s1["num_heads"], gamma=s1["gamma"],
                                   optimizer=optimizer, heads_path=str(tmp))
    started, cpu = time.time(), time.process_time()
    distilled = out / "distilled.jsonl"
    if not distilled.is_file():
        prompts = [r["prompt"] for preset, n in s1["prompts"].items()
                   for r in ReasoningTask.preset(preset, num_train=n, num_val=1, seed=s1["task_seed"]).records("train")]
        self_distill(module.model, module.tokenizer, prompts, distilled, max_new_tokens=s1["max_new_tokens"],
                     batch_size=64)
    records = [json.loads(line) for line in distilled.read_text().splitlines()]
    distill_seconds, distill_cpu = time.time() - started, time.process_time() - cpu
    pl.seed_everything(s1["task_seed"], verbose=False)
    data = SFTDataModule(train_file=str(distilled), val_fraction=s1["val_fraction"], max_length=settings["max_length"],
                         batch_size=s1["batch_size"], eval_batch_size=64, padding_free=settings["padding_free"],
                         seed=s1["task_seed"])
    run = cpu_trainer(validate=True, max_epochs=s1["epochs"])
    run.fit(module, datamodule=data)
    metrics = run.validate(module, datamodule=data, verbose=False)[0]
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    accuracy = [float(metrics[f"val/head{k}_acc"]) for k in range(1, s1["num_heads"] + 1)]
    return dict(method="stage1", heads=str(target), samples=len(records), steps=run.global_step,
                in_own_format=sum(not in_words(r["completion"]) for r in records) / len(records),
                val_loss=float(metrics["val/loss"]), head_accuracy=accuracy,
                distill_seconds=distill_seconds, distill_cpu_seconds=distill_cpu, seconds=time.time() - started,
                cpu_seconds=time.process_time() - cpu)


def head_accuracy_callback(num_heads: int):
    """A callback recording the CAFT heads' top-1 accuracy on the training batches, first and last step."""
    from lightning.pytorch import Callback

    class HeadAccuracy(Callback):
        def __init__(self):
            self.first: Optional[list[float]] = None
            self.last: Optional[list[float]] = None

        def _read(self, trainer):
            keys = [f"train/caft_head{k}_acc" for k in range(1, num_heads + 1)]
            if all(k in trainer.callback_metrics for k in keys):
                return [float(trainer.callback_metrics[k]) for k in keys]
            return None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.first is None and batch_idx > 0:
                self.first = self._read(trainer)

        def on_train_end(self, trainer, pl_module):
            self.last = self._read(trainer)

    return HeadAccuracy()


def evaluate(model, data) -> dict:
    """Held-out scores of a trained (or untouched) module: CE_0 by teacher forcing, then greedy answers."""
    generation = model.generation_batches
    model.generation_batches = 0  # the loss pass only; the answers come from predict
    metrics = cpu_trainer(validate=True).validate(model, datamodule=data, verbose=False)[0]
    model.generation_batches = generation
    rows = [row for batch in cpu_trainer().predict(model, datamodule=data) for row in batch]
    return dict(exact_match=sum(r["correct"] for r in rows) / len(rows),
                in_words=sum(in_words(r["completion"]) for r in rows) / len(rows),
                val_loss=float(metrics["val/loss"]), examples=[r["completion"] for r in rows[:2]])


def run_one(method: str, seed: int, base: str, settings: dict[str, Any], heads: Optional[str] = None,
            out: Optional[str] = None) -> dict:
    """One run of the part.

    Args:
        method: ``"stage1"`` (build the heads under ``out``), ``"base"`` (score the base), ``"ntp"`` or ``"caft"``
            (fine-tune, then score).
        seed: Seed of the run (LoRA init, data order, dropout).
        base: Directory of the pretrained base.
        settings: The part's settings (see :data:`SETTINGS`).
        heads: Stage-1 heads directory (``"caft"`` only). Default ``None``.
        out: The part's output directory (``"stage1"`` only). Default ``None``.
    """
    import lightning.pytorch as pl
    import torch

    from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig, SFTDataModule
    from lightning_tokens.caft import ConceptAwareFineTuning

    torch.set_flush_denormal(True)
    if method == "stage1":
        return build_heads(base, settings, Path(out))
    pl.seed_everything(seed, verbose=False)
    optimizer = OptimizerConfig(name="adamw", lr=settings["lr"], warmup=settings["warmup"], schedule="cosine")
    model = CausalLMModule(model=ModelSpec(name_or_path=base, lora=dict(settings["lora"]) if settings["lora"] else None,
                                                 seed=seed), optimizer=optimizer,
                           max_new_tokens=settings["max_new_tokens"])
    data = SFTDataModule(task=task(settings), max_length=settings["max_length"], batch_size=settings["batch_size"],
                         eval_batch_size=settings["eval_batch_size"], padding_free=settings["padding_free"], seed=seed)
    data.tokenizer = model.tokenizer
    started, cpu = time.time(), time.process_time()
    result: dict[str, Any] = dict(method=method, seed=seed, steps=0)
    if method in METHODS:
        callbacks = []
        if method == "caft":
            recorder = head_accuracy_callback(settings["stage1"]["num_heads"])
            callbacks = [ConceptAwareFineTuning(heads_path=heads, **CAFT), recorder]
        run = cpu_trainer(callbacks)
        run.fit(model, datamodule=data)
        result.update(steps=run.global_step, train_seconds=time.time() - started,
                      train_cpu_seconds=time.process_time() - cpu)
        if method == "caft":
            result.update(head_accuracy_first=recorder.first, head_accuracy_last=recorder.last)
    elif method != "base":
        raise ValueError(f"caft.run_one: unknown method {method!r}")
    result.update(evaluate(model, data), seconds=time.time() - started, cpu_seconds=time.process_time() - cpu)
    return result


def table(results: list[dict], stage1: Optional[dict] = None) -> str:
    """Markdown: per method exact match, style share and CE_0 (mean ± sd, per seed); the paired CAFT minus
    next-token difference; and stage 1's held-out head accuracy.

    Args:
        results: ``run_one`` results of the ``base``, ``ntp`` and ``caft`` runs.
        stage1: ``run_one`` result of ``stage1``. Default ``None``: no stage-1 line.
    """
    def cell(values, scale, digits):
        values = [scale * v for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

    lines = ["| method | exact match % | per seed | answers in words % | CE_0 (held-out words) | per seed | steps |",
             "|---|---|---|---|---|---|---|"]
    by = {m: sorted((r for r in results if r["method"] == m), key=lambda r: r["seed"]) for m in ROWS}
    for method in ROWS:
        rows = by[method]
        if not rows:
            continue
        em, loss = [r["exact_match"] for r in rows], [r["val_loss"] for r in rows]
        lines.append(f"| {NAMES[method]} | {cell(em, 100, 1)} | {', '.join(f'{100 * e:.1f}' for e in em)} | "
                     f"{cell([r['in_words'] for r in rows], 100, 1)} | {cell(loss, 1, 4)} | "
                     f"{', '.join(f'{v:.3f}' for v in loss)} | {rows[0]['steps']} |")
    notes = []
    ntp = {r["seed"]: r for r in by["ntp"]}
    pairs = [(r, ntp[r["seed"]]) for r in by["caft"] if r["seed"] in ntp]
    if len(pairs) >= 2:
        for key, scale, unit in (("exact_match", 100, " points"), ("val_loss", 1, "")):
            p = paired([c[key] for c, _ in pairs], [n[key] for _, n in pairs])
            verdict = "inside the seed spread" if p["inside"] else "outside the seed spread (paired t, 95%)"
            notes.append(f"CAFT minus next-token, {key}: {scale * p['mean']:+.{1 if scale > 1 else 4}f} ± "
                         f"{scale * p['sd']:.{1 if scale > 1 else 4}f}{unit} over {len(pairs)} seeds "
                         f"(t = {p['t']:.2f}): {verdict}.")
    if stage1 is not None:
        accuracy = ", ".join(f"{a:.3f}" for a in stage1["head_accuracy"])
        notes.append(f"Stage 1: {stage1['samples']} self-distilled answers ({100 * stage1['in_own_format']:.0f}% "
                     f"in the base's own format), {stage1['steps']} steps; held-out top-1 accuracy of heads 1-"
                     f"{len(stage1['head_accuracy'])}: {accuracy}.")
    first = [r["head_accuracy_first"] for r in by["caft"] if r.get("head_accuracy_first")]
    last = [r["head_accuracy_last"] for r in by["caft"] if r.get("head_accuracy_last")]
    if first and last:
        mean = lambda rows: ", ".join(f"{statistics.mean(col):.3f}" for col in zip(*rows))  # noqa: E731
        notes.append(f"Heads on the new style (training batches, mean over seeds): first step {mean(first)}; "
                     f"last step {mean(last)}.")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def run_part(base: Path, out: Path, jobs: int, quick: bool, seeds: Optional[list[int]] = None) -> str:
    """The whole part: stage 1 beside the base's own score, then next-token and CAFT per seed; the markdown.

    Args:
        base: Directory of the pretrained base.
        out: Output directory of the part (one JSON per run; the heads and distilled answers under it).
        jobs: Runs side by side (one thread each).
        quick: Smoke sizes (:data:`QUICK`): checks the pipeline, not the method.
        seeds: Seeds of the fine-tuning runs. Default ``None``: :data:`SEEDS` (two of them when ``quick``).
    """
    settings = {**SETTINGS, **(QUICK if quick else {})}
    out = Path(out)
    same_settings(out, {"base": str(base), **settings})
    seeds = list(seeds) if seeds is not None else list(SEEDS[:2] if quick else SEEDS)
    common = dict(base=str(base), settings=settings)
    # Next-token runs need no heads: they go beside stage 1; CAFT runs follow once the heads exist.
    first = [("stage1", dict(method="stage1", seed=0, out=str(out), **common)),
             ("base-0", dict(method="base", seed=0, **common)),
             *((f"ntp-{seed}", dict(method="ntp", seed=seed, **common)) for seed in seeds)]
    stage1, base_row, *ntp = run_all("caft", first, out, jobs)
    runs = [(f"caft-{seed}", dict(method="caft", seed=seed, heads=stage1["heads"], **common)) for seed in seeds]
    results = ntp + run_all("caft", runs, out, jobs)
    return table([base_row, *results], stage1)
