"""Budget guidance as its paper ran it, on the pretrained base fine-tuned on mixed concise and verbose traces.

Protocol (one seed is one pipeline; every choice and why):

1. ``finetune``: the base, fully fine-tuned (no LoRA: the paper's LLM is a full reasoning model) for one epoch
   on 2,048 fresh ``easy`` problems in the ``mixed`` style (concise or verbose at random per problem), task
   seed 300, AdamW 5e-4 with 5% warm-up and linear decay, batches of 16. ``easy`` because the base is
   decent there (35% exact match) and nowhere else (medium 5.5%), so a thinking budget has accuracy to lose;
   mixed style because the paper's model must have both long and short ways to think for guidance to choose.
2. ``predictor``: the fine-tuned model, frozen, samples (temperature 1) its own traces for 2,048 fresh
   prompts (task seed 301), as the paper trains its predictor on traces of the model it steers. The
   library's small predictor body (a 2-layer transformer over the 7 hidden states, CLS read-out), 64 wide
   (155k weights; the default width 192 costs 2.5x the time per step, over the part's budget), is trained
   on 90% of them for 3 epochs at lr 1e-3 constant after 5% warm-up: the paper's 1e-4 for one epoch suits
   hundreds of thousands of traces, not two thousand. The other 10% give its validation statistics and the
   calibration.
   Meanwhile (``jobs=2``) ``forcing`` decodes 512 held-out problems (task seed 300, ``val``) greedily without
   a budget, whose mean thinking length ``M`` sets the budgets ``B = 25/50/75/100% of M``, then with budget
   forcing at each ``B`` (s1's baseline: ``</think>`` forced at the budget, no answer cue).
3. ``guided`` runs, one per thresholds set (every budget in one process: starting a process costs more than
   decoding at one budget): the same problems, greedy, guidance at the first thinking token and after every
   newline token (the paper's step boundaries), nothing forced at the budget:
   ``reference`` (rate >= 10, shape > 1, decoded mode >= 0.9, the library default); ``calibrated``
   (:func:`lightning_tokens.budget.calibrate_thresholds` on the held-out traces: the 5% quantile of each
   statistic at realised next tokens whose decoded length is within 10 tokens of the truth, capped at the
   reference's value, so only a check that masks trained rows is loosened); ``quantiles`` (the same
   quantiles without the cap, to show why the cap is there) and ``none`` (every row keeps its weight: the
   earlier run's ablation). Each run also records, at every guided step of every row, what the thresholds
   masked: the share of the vocabulary, the share of the model's probability mass, whether the model's own
   greedy token was masked, which check failed, how often the guided token is ``</think>`` and how often
   every candidate was masked (the fallback to the argmax token, i.e. no guidance at all).

Reported: accuracy (exact match), mean thinking tokens, the share of traces within the budget, the share in
the verbose style, per row of the table; the masking diagnosis per thresholds set at 25%; the predictor's
validation statistics and the threshold sets, with the share of realised-token rows (and of realised
``</think>`` rows) each keeps; a plot of
accuracy against mean thinking tokens (``budget.png`` under ``out``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from experiments.protocols.jobs import cpu_trainer, run_all, same_settings
from lightning_tokens.files import atomic_path

#: Every setting of the part (``quick`` overrides a few).
SETTINGS = dict(preset="easy", style="mixed", task_seed=300, trace_seed=301, num_finetune=2048, finetune_batch=16,
                finetune_lr=5e-4, padding_free=True, max_length=256, num_traces=2048, trace_batch=128,
                trace_max_new_tokens=200,
                predictor_width=64, predictor_epochs=3, predictor_lr=1e-3, predictor_batch=32, val_fraction=0.1,
                num_eval=512, eval_batch=128, max_new_tokens=200, fractions=(0.25, 0.5, 0.75, 1.0), quantile=0.05,
                window=10.0)
QUICK = dict(num_finetune=64, num_traces=96, predictor_epochs=1, num_eval=16, max_new_tokens=160, fractions=(0.25, 1.0))
SEEDS = (0,)
#: Thresholds sets of guidance: the reference's (library default), calibrated, the bare quantiles of the
#: calibration rule (no cap at the reference), and none (no row mask).
THRESHOLDS = ("reference", "calibrated", "quantiles", "none")
REFERENCE = dict(min_rate=10.0, min_shape=1.0, min_mode=0.9)
NO_MASK = dict(min_rate=0.0, min_shape=0.0, min_mode=-1.0)


def task(settings: dict[str, Any], seed_key: str = "task_seed", num_train: int = 0, num_val: int = 0):
    """The ``preset`` task of ``settings`` in ``style`` with its ``seed_key`` seed."""
    from lightning_tokens import ReasoningTask

    return ReasoningTask.preset(settings["preset"], style=settings["style"], num_train=max(1, num_train),
                                num_val=max(1, num_val), seed=settings[seed_key])


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


# -- stage 1: the fine-tuned model -------------------------------------------------------------------------
def finetune(base: str, settings: dict[str, Any], seed: int, out: str) -> dict:
    """Fully fine-tune ``base`` for one epoch on ``num_finetune`` mixed-style problems; export to ``out/model``.

    Args:
        base: The pretrained base directory.
        settings: :data:`SETTINGS` (with any overrides).
        seed: Seed of initialisation order and shuffling.
        out: The seed's directory; the model lands in ``out/model`` (written to ``model.partial`` first).
    """
    import lightning.pytorch as pl

    from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig, SFTDataModule

    target = Path(out) / "model"
    for stale in ("traces.jsonl", "predictor.pt"):  # made from an earlier model: the next stage redoes them
        (Path(out) / stale).unlink(missing_ok=True)
    started = time.time()
    pl.seed_everything(seed, verbose=False)
    optimizer = OptimizerConfig(name="adamw", lr=settings["finetune_lr"], warmup=0.05, schedule="linear")
    model = CausalLMModule(model=ModelSpec(name_or_path=base, seed=seed), optimizer=optimizer, max_new_tokens=0)
    data = SFTDataModule(task=task(settings, num_train=settings["num_finetune"]), max_length=settings["max_length"],
                         batch_size=settings["finetune_batch"], padding_free=settings["padding_free"], seed=seed)
    trainer = cpu_trainer()
    trainer.fit(model, datamodule=data)
    tmp = target.with_name("model.partial")
    model.export(tmp)
    _replace_dir(tmp, target)
    return dict(stage="finetune", seed=seed, steps=trainer.global_step, seconds=time.time() - started,
                train_loss=float(trainer.callback_metrics.get("train/loss", float("nan"))))


# -- stage 2: traces, predictor, calibration (beside forcing) ----------------------------------------------------------
def train_predictor(settings: dict[str, Any], seed: int, out: str) -> dict:
    """The model's own traces, the predictor trained on them, its held-out statistics and the calibration.

    Writes ``out/traces.jsonl`` and ``out/predictor.pt`` (each through a temporary file).

    Args:
        settings: :data:`SETTINGS`.
        seed: Seed of trace sampling, the split and predictor training.
        out: The seed's directory (holds ``model``).
    """
    import lightning.pytorch as pl
    import torch

    from lightning_tokens import ModelSpec, OptimizerConfig
    from lightning_tokens.budget import (
        BudgetPredictor,
        BudgetPredictorModule,
        TraceDataModule,
        calibrate_thresholds,
        collect_traces,
        decoded_mode,
    )
    from lightning_tokens.modeling import load_frozen_causal_lm

    out_dir = Path(out)
    started = time.time()
    pl.seed_everything(seed, verbose=False)
    traces_path = out_dir / "traces.jsonl"
    if not traces_path.is_file():
        model, tokenizer = load_frozen_causal_lm(ModelSpec(name_or_path=str(out_dir / "model")))
        prompts = [{"prompt": r["prompt"], "answer": r["answer"]}
                   for r in task(settings, "trace_seed", num_train=settings["num_traces"]).records("train")]
        collect_traces(model, tokenizer, prompts, traces_path, max_new_tokens=settings["trace_max_new_tokens"],
                       batch_size=settings["trace_batch"], do_sample=True, temperature=1.0)
    traces = [json.loads(line) for line in traces_path.read_text().splitlines()]
    trace_seconds = time.time() - started
    optimizer = OptimizerConfig(lr=settings["predictor_lr"], warmup=0.05, schedule="constant")
    module = BudgetPredictorModule(ModelSpec(name_or_path=str(out_dir / "model")),
                                   predictor=dict(d_model=settings["predictor_width"]), optimizer=optimizer)
    data = TraceDataModule(train_file=str(traces_path), max_length=settings["max_length"],
                           batch_size=settings["predictor_batch"], eval_batch_size=128,
                           val_fraction=settings["val_fraction"], seed=seed)
    trained = out_dir / "predictor.pt"
    if trained.is_file():  # trained before the run was interrupted: only the statistics are left to compute
        module.predictor.load_state_dict(BudgetPredictor.load(trained).state_dict())
        data.tokenizer = module.tokenizer
        data.setup("fit")
    else:
        cpu_trainer(max_epochs=settings["predictor_epochs"]).fit(module, datamodule=data)
        with atomic_path(trained) as tmp:
            module.predictor.save(tmp)

    # Held-out statistics at the realised next tokens, and the rows no training trace ever reached.
    module.eval()
    alphas, rates, lengths, nll = [], [], [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            loss, alpha, rate, length = module.step(batch)
            nll.append(loss), alphas.append(alpha), rates.append(rate), lengths.append(length)
    alpha, rate, length = torch.cat(alphas), torch.cat(rates), torch.cat(lengths)
    calibrated = calibrate_thresholds(alpha, rate, length, settings["quantile"], settings["window"])
    quantiles_only = calibrate_thresholds(alpha, rate, length, settings["quantile"], settings["window"], ceiling={})
    mode = decoded_mode(alpha, rate)
    error = (mode - length).abs()

    def kept(thresholds: dict[str, float], where: torch.Tensor) -> float:
        ok = (rate >= thresholds["min_rate"]) & (alpha > thresholds["min_shape"]) & (mode >= thresholds["min_mode"])
        return float(ok[where].float().mean())

    def quantiles(values: torch.Tensor) -> list[float]:
        levels = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
        return [round(float(q), 3) for q in torch.quantile(values.double(), levels)]

    every, closing = torch.ones_like(length, dtype=torch.bool), length == 1
    sets = dict(reference=REFERENCE, calibrated=calibrated, quantiles_only=quantiles_only)
    finished = [t for t in traces if t["finished"]]
    return dict(stage="predictor", seed=seed, seconds=time.time() - started, trace_seconds=trace_seconds,
                traces=len(traces), unfinished=len(traces) - len(finished),
                trace_accuracy=sum(t.get("correct", False) for t in traces) / len(traces),
                trace_mean_thinking=sum(t["thinking_length"] for t in finished) / max(1, len(finished)),
                predictor=dict(nll=float(torch.cat(nll).mean()), abs_error=float(error.mean()),
                               within_window=float((error <= settings["window"]).float().mean())),
                val_positions=int(length.numel()), calibrated=calibrated, quantiles_only=quantiles_only,
                realised_kept={name: kept(t, every) for name, t in sets.items()},
                think_end_kept={name: kept(t, closing) for name, t in sets.items()},
                rate_q05_50_95=quantiles(rate), shape_q05_50_95=quantiles(alpha), mode_q05_50_95=quantiles(mode))


# -- decoding -------------------------------------------------------------------------------------------------
def _diagnosing_processor(model, predictor, tokenizer, budget: float, thresholds: dict[str, float]):
    """A :class:`BudgetGuidanceLogitsProcessor` that also counts, per guided row and step, what its checks mask."""
    import torch

    from lightning_tokens.budget import BudgetGuidanceLogitsProcessor, guidance_weights
    from lightning_tokens.budget.gamma import decoded_mode

    class Diagnosing(BudgetGuidanceLogitsProcessor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.end_id = self.tracker.end_id
            self.counts = dict(rows=0, vocab_masked=0.0, mass_masked=0.0, top_masked=0, fallback=0, changed=0,
                               chose_end=0, rate_fail=0.0, shape_fail=0.0, mode_fail=0.0)

        def _weights(self, log_p, states, remaining_budget):
            alpha, rate = self.predictor.gamma(self.predictor.features(states))
            w = guidance_weights(alpha, rate, remaining_budget, self.min_rate, self.min_shape, self.min_mode)
            p = log_p.exp()
            masked = w == 0
            rate_fail, shape_fail = rate < self.min_rate, alpha <= self.min_shape
            mode_fail = decoded_mode(alpha, rate) < self.min_mode
            top = log_p.argmax(-1)
            guided = torch.where(masked.all(-1), top, (log_p + torch.log(w)).argmax(-1))
            c = self.counts
            c["rows"] += log_p.shape[0]
            c["vocab_masked"] += float(masked.float().mean(-1).sum())
            c["mass_masked"] += float((p * masked).sum())
            c["top_masked"] += int(masked.gather(1, top[:, None]).sum())
            c["fallback"] += int(masked.all(-1).sum())
            c["changed"] += int((guided != top).sum())
            c["chose_end"] += int((guided == self.end_id).sum())
            for name, fail in (("rate_fail", rate_fail), ("shape_fail", shape_fail), ("mode_fail", mode_fail)):
                c[name] += float((p * fail).sum())  # probability mass failing that check
            return w

    return Diagnosing(model, predictor, tokenizer, budget, **thresholds)


def decode(model, tokenizer, records: list[dict], make_processors, batch_size: int, max_new_tokens: int) -> dict:
    """Greedy decoding of every record; per record correct, thinking length, closed, verbose style.

    Args:
        model: The LM.
        tokenizer: Its tokenizer.
        records: Task records (``prompt``, ``answer``).
        make_processors: ``() -> list`` of logits processors for one batch.
        batch_size: Prompts per ``generate()``.
        max_new_tokens: Longest completion.
    """
    import torch

    from lightning_tokens.data.encode import pad, prompt_ids
    from lightning_tokens.data.reasoning_task import check_answer, thinking_length

    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    rows, used = [], []
    for first in range(0, len(records), batch_size):
        chunk = records[first: first + batch_size]
        ids = [prompt_ids(tokenizer, r["prompt"]) for r in chunk]
        input_ids = pad(ids, tokenizer.pad_token_id, side="left")
        attention_mask = pad([[1] * len(i) for i in ids], 0, side="left")
        processors = make_processors()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for processor in processors:
            if hasattr(processor, "remove"):
                processor.remove()
        used.extend(processors)
        for record, row in zip(chunk, out[:, input_ids.shape[1]:].tolist()):
            row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            text = tokenizer.decode(row, skip_special_tokens=True)
            rows.append(dict(correct=bool(check_answer(text, record["answer"])),
                             thinking=thinking_length(row, start, end), closed=end in row, verbose="step 1:" in text))
    return dict(rows=rows, processors=used)


def summary(rows: list[dict], budget: Optional[float]) -> dict:
    """Accuracy, mean thinking, closed, verbose and (with a budget) within-budget shares of decoded rows."""
    n = len(rows)
    result = dict(accuracy=sum(r["correct"] for r in rows) / n, mean_thinking=sum(r["thinking"] for r in rows) / n,
                  closed=sum(r["closed"] for r in rows) / n, verbose=sum(r["verbose"] for r in rows) / n, n=n)
    if budget is not None:
        result["within"] = sum(r["thinking"] <= budget for r in rows) / n
    return result


def _eval_records(settings: dict[str, Any]) -> list[dict]:
    return task(settings, num_val=settings["num_eval"]).records("val")


def forcing(settings: dict[str, Any], seed: int, out: str) -> dict:
    """Unguided greedy decoding of the held-out problems (mean thinking ``M``), then budget forcing at each budget.

    Args:
        settings: :data:`SETTINGS`.
        seed: The pipeline's seed (greedy decoding itself is deterministic).
        out: The seed's directory (holds ``model``).
    """
    from lightning_tokens import ModelSpec
    from lightning_tokens.budget import BudgetForcing
    from lightning_tokens.modeling import load_frozen_causal_lm

    started = time.time()
    model, tokenizer = load_frozen_causal_lm(ModelSpec(name_or_path=str(Path(out) / "model")))
    records = _eval_records(settings)
    decoded = decode(model, tokenizer, records, lambda: [], settings["eval_batch"], settings["max_new_tokens"])
    unguided = summary(decoded["rows"], None)
    runs = [dict(method="unguided", fraction=None, budget=None, **unguided)]
    for fraction in settings["fractions"]:
        budget = max(1, round(fraction * unguided["mean_thinking"]))
        decoded = decode(model, tokenizer, records, lambda: [BudgetForcing(tokenizer, budget)], settings["eval_batch"],
                         settings["max_new_tokens"])
        runs.append(dict(method="forcing", fraction=fraction, budget=budget, **summary(decoded["rows"], budget)))
    return dict(stage="forcing", seed=seed, seconds=time.time() - started, runs=runs)


def guided(settings: dict[str, Any], seed: int, out: str, thresholds_name: str, thresholds: dict[str, float],
           budgets: list[list[float]]) -> dict:
    """Budget guidance with one thresholds set at every budget, and what the thresholds masked.

    Args:
        settings: :data:`SETTINGS`.
        seed: The pipeline's seed.
        out: The seed's directory (holds ``model`` and ``predictor.pt``).
        thresholds_name: ``"reference"``, ``"calibrated"`` or ``"none"`` (for the table).
        thresholds: ``min_rate``, ``min_shape``, ``min_mode``.
        budgets: ``[fraction, budget]`` pairs: the budget in tokens and its share of the unguided mean.
    """
    from lightning_tokens import ModelSpec
    from lightning_tokens.budget import BudgetPredictor
    from lightning_tokens.modeling import load_frozen_causal_lm

    started = time.time()
    model, tokenizer = load_frozen_causal_lm(ModelSpec(name_or_path=str(Path(out) / "model")))
    predictor = BudgetPredictor.load(Path(out) / "predictor.pt")
    records = _eval_records(settings)
    runs = []
    for fraction, budget in budgets:
        decoded = decode(model, tokenizer, records,
                         lambda: [_diagnosing_processor(model, predictor, tokenizer, budget, thresholds)],
                         settings["eval_batch"], settings["max_new_tokens"])
        counts: dict[str, float] = {}
        for processor in decoded["processors"]:
            for key, value in processor.counts.items():
                counts[key] = counts.get(key, 0) + value
        steps = max(1, counts["rows"])
        diagnosis = {key: value / steps for key, value in counts.items() if key != "rows"}
        diagnosis["steps_per_trace"] = counts["rows"] / len(decoded["rows"])
        runs.append(dict(method=f"guidance ({thresholds_name})", fraction=fraction, budget=budget, diagnosis=diagnosis,
                         **summary(decoded["rows"], budget)))
    return dict(stage="guided", seed=seed, seconds=time.time() - started, thresholds_name=thresholds_name,
                thresholds=thresholds, runs=runs)


def run_one(stage: str, **kwargs) -> dict:
    """One independent run of the part: ``stage`` is ``finetune``, ``predictor``, ``forcing`` or ``guided``.

    Args:
        stage: Which function runs (:func:`finetune`, :func:`train_predictor`, :func:`forcing`, :func:`guided`).
        **kwargs: Its arguments.
    """
    functions = dict(finetune=finetune, predictor=train_predictor, forcing=forcing, guided=guided)
    return functions[stage](**kwargs)


# -- the part -------------------------------------------------------------------------------------------------
def run_part(base: Path, out: Path, jobs: int, quick: bool, seeds: Optional[list[int]] = None) -> str:
    """Run the whole part under ``out`` (resumable) and return its markdown tables and the plot's path.

    Args:
        base: The pretrained base's model directory.
        out: The part's directory (``quick`` runs need their own).
        jobs: Runs side by side (one thread each).
        quick: Tiny sizes: a smoke run of the pipeline, not evidence.
        seeds: Pipeline seeds; ``None``: :data:`SEEDS` (one: the part's wall-time budget allows one pipeline).
    """

    settings = {**SETTINGS, **(QUICK if quick else {})}
    same_settings(out, {"base": str(base), **settings})
    seeds = list(seeds) if seeds is not None else list(SEEDS)
    started = time.time()
    dirs = {seed: out / f"seed-{seed}" for seed in seeds}
    common = lambda seed: dict(settings=settings, seed=seed, out=str(dirs[seed]))  # noqa: E731
    run_all("budget", [(f"finetune-{s}", dict(stage="finetune", base=str(base), **common(s))) for s in seeds],
            out, jobs)
    prepared = run_all("budget", [run for s in seeds for run in (
        (f"predictor-{s}", dict(stage="predictor", **common(s))),
        (f"forcing-{s}", dict(stage="forcing", **common(s))))], out, jobs)
    predictors = {r["seed"]: r for r in prepared if r["stage"] == "predictor"}
    forced = {r["seed"]: r for r in prepared if r["stage"] == "forcing"}
    runs = []
    for s in seeds:
        sets = dict(reference=REFERENCE, calibrated=predictors[s]["calibrated"],
                    quantiles=predictors[s]["quantiles_only"], none=NO_MASK)
        budgets = [[run["fraction"], run["budget"]] for run in forced[s]["runs"][1:]]
        runs += [(f"guided-{name}-{s}", dict(stage="guided", thresholds_name=name, thresholds=sets[name],
                                             budgets=budgets, **common(s))) for name in THRESHOLDS]
    guided_runs = [run for result in run_all("budget", runs, out, jobs) for run in result["runs"]]
    plot = write_plot(forced, guided_runs, out / "budget.png")
    text = tables(forced, guided_runs, predictors)
    minutes = (time.time() - started) / 60
    return f"{text}\n\nPlot: `{plot}`" + ("" if plot else " (matplotlib missing)") + f" (this call: {minutes:.1f} min)"


def _rows(forced: dict, guided_runs: list[dict]) -> list[dict]:
    """Every table row, averaged over seeds: unguided, then per budget forcing and each thresholds set."""
    groups: dict[tuple, list[dict]] = {}
    for result in forced.values():
        for run in result["runs"]:
            groups.setdefault((run["method"], run["fraction"]), []).append(run)
    for run in guided_runs:
        groups.setdefault((run["method"], run["fraction"]), []).append(run)
    order = ["unguided", "forcing"] + [f"guidance ({name})" for name in THRESHOLDS]
    rows = []
    for (method, fraction), items in sorted(groups.items(), key=lambda kv: (kv[0][1] or 0, order.index(kv[0][0]))):
        row = dict(method=method, fraction=fraction, budget=statistics.mean(r["budget"] for r in items)
                   if items[0]["budget"] is not None else None, seeds=len(items))
        for key in ("accuracy", "mean_thinking", "within", "verbose", "closed"):
            if key in items[0]:
                row[key] = statistics.mean(r[key] for r in items)
        if "diagnosis" in items[0]:
            row["diagnosis"] = {k: statistics.mean(r["diagnosis"][k] for r in items) for k in items[0]["diagnosis"]}
        rows.append(row)
    return rows


def tables(forced: dict, guided_runs: list[dict], predictors: dict) -> str:
    """Markdown: the main table, the masking diagnosis at every budget, the predictor and its thresholds."""
    rows = _rows(forced, guided_runs)
    lines = ["| method | budget (share of unguided mean) | accuracy | mean thinking tokens | within budget | "
             "verbose style |", "|---|---|---|---|---|---|"]
    for r in rows:
        budget = "none" if r["budget"] is None else f"{r['budget']:.0f} ({r['fraction']:.0%})"
        within = f"{r['within']:.3f}" if "within" in r else ""
        lines.append(f"| {r['method']} | {budget} | {r['accuracy']:.3f} | {r['mean_thinking']:.1f} | {within} | "
                     f"{r['verbose']:.2f} |")
    tightest = min(r["fraction"] for r in rows if r["fraction"] is not None)
    lines += ["", f"What the thresholds masked at the tightest budget ({tightest:.0%}), per guided step of a row "
              "(means over steps; the checks do not involve the budget, so other budgets differ only through the "
              "trajectories):", "",
              "| thresholds | guided steps per trace | vocabulary masked | probability mass masked | "
              "greedy token masked | every candidate masked (argmax fallback) | guidance changed the greedy token | "
              "guided token is `</think>` | mass failing rate / shape / mode |", "|---" * 9 + "|"]
    for r in rows:
        d = r.get("diagnosis")
        if d is None or r["fraction"] != tightest:
            continue
        lines.append(f"| {r['method'][10:-1]} | {d['steps_per_trace']:.1f} | "
                     f"{d['vocab_masked']:.2f} | "
                     f"{d['mass_masked']:.2f} | {d['top_masked']:.2f} | {d['fallback']:.2f} | {d['changed']:.2f} | "
                     f"{d['chose_end']:.2f} | {d['rate_fail']:.2f} / {d['shape_fail']:.2f} / {d['mode_fail']:.2f} |")
    lines += ["", "Predictor on its held-out traces (realised next tokens) and the thresholds:", "",
              "| seed | traces (accuracy, mean thinking) | NLL / abs error / within 10 tokens | rate / shape / decoded "
              "mode (5%, 50%, 95%) | calibrated (rate, shape, mode) | bare quantiles | rows kept: reference / "
              "calibrated / bare | `</think>` rows (L = 1) kept |", "|---|---|---|---|---|---|---|---|"]
    for seed, p in sorted(predictors.items()):
        v, c, q = p["predictor"], p["calibrated"], p["quantiles_only"]
        kept, end = p["realised_kept"], p["think_end_kept"]
        lines.append(f"| {seed} | {p['traces']} ({p['trace_accuracy']:.2f}, {p['trace_mean_thinking']:.1f}) | "
                     f"{v['nll']:.3f} / {v['abs_error']:.1f} / {v['within_window']:.2f} | {p['rate_q05_50_95']} / "
                     f"{p['shape_q05_50_95']} / {p['mode_q05_50_95']} | {c['min_rate']:.2f}, {c['min_shape']:.2f}, "
                     f"{c['min_mode']:.2f} | {q['min_rate']:.2f}, {q['min_shape']:.2f}, {q['min_mode']:.2f} | "
                     f"{kept['reference']:.3f} / {kept['calibrated']:.3f} / {kept['quantiles_only']:.3f} | "
                     f"{end['reference']:.2f} / {end['calibrated']:.2f} / {end['quantiles_only']:.2f} |")
    return "\n".join(lines)


def _clusters(line: list[dict]) -> list[list[dict]]:
    """Consecutive points of a line within 1 token and 0.01 accuracy of the group's first point."""
    groups: list[list[dict]] = []
    for r in line:
        if groups and abs(r["mean_thinking"] - groups[-1][0]["mean_thinking"]) < 1.0 \
                and abs(r["accuracy"] - groups[-1][0]["accuracy"]) < 0.01:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def write_plot(forced: dict, guided_runs: list[dict], path: Path) -> Optional[Path]:
    """Accuracy against mean thinking tokens per method (written atomically); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = _rows(forced, guided_runs)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    base = next(r for r in rows if r["method"] == "unguided")
    ax.scatter([base["mean_thinking"]], [base["accuracy"]], color="black", marker="*", s=120, label="unguided",
               zorder=3)
    colors = {"forcing": "tab:orange", "guidance (reference)": "tab:blue", "guidance (calibrated)": "tab:green",
              "guidance (quantiles)": "tab:purple", "guidance (none)": "tab:gray"}
    for method, color in colors.items():
        line = [r for r in rows if r["method"] == method]
        ax.plot([r["mean_thinking"] for r in line], [r["accuracy"] for r in line], "o-", color=color,
                label="guidance, no row mask" if method == "guidance (none)" else method)
        for group in _clusters(line):  # budgets that landed on the same point share one label
            label = f"{group[0]['fraction']:.0%}" + (f"-{group[-1]['fraction']:.0%}" if len(group) > 1 else "")
            ax.annotate(label, (group[0]["mean_thinking"], group[0]["accuracy"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=color)
    ax.set_xlabel("mean thinking tokens")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_title("Budget guidance on the fine-tuned base (easy, mixed styles)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
