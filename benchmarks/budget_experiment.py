"""Budget guidance experiment on the embedded task: a tiny Llama trained on mixed concise/verbose traces.

1. SFT the tiny model on ReasoningTask(style="mixed") (it learns both thinking styles).
2. Collect its own traces on training prompts (sampling), train a BudgetPredictor on them.
3. On validation prompts: unguided greedy decoding gives the mean thinking length M; then budgets at
   25/50/75/100% of M for budget forcing and budget guidance (greedy, newline-step guidance).
Writes results JSON, a markdown table and a PNG plot into --out.

    python benchmarks/budget_experiment.py --out runs/budget-experiment
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_tokens.budget import (BudgetForcing, BudgetGuidanceLogitsProcessor, BudgetPredictorModule,
                                     TraceDataModule, collect_traces, estimate_thinking_length)
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask, check_answer, thinking_length
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.module import CausalLMModule
from lightning_tokens.optim import OptimizerConfig


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@torch.no_grad()
def evaluate(model, tokenizer, records, processors_for_batch, batch_size, max_new_tokens):
    """Greedy decoding of every record; accuracy, thinking lengths and whether thinking closed."""
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    tokenizer.padding_side = "left"
    correct, lengths, closed = [], [], []
    for first in range(0, len(records), batch_size):
        chunk = records[first: first + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True).to(model.device)
        processors = processors_for_batch(first, len(chunk))
        out = model.generate(**enc, logits_processor=processors, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for processor in processors:
            if hasattr(processor, "remove"):
                processor.remove()
        for record, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist()):
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            correct.append(check_answer(tokenizer.decode(ids, skip_special_tokens=True), record["answer"]))
            lengths.append(thinking_length(ids, start, end))
            closed.append(end in ids)
    return {"accuracy": sum(correct) / len(correct), "mean_thinking": sum(lengths) / len(lengths),
            "closed": sum(closed) / len(closed), "lengths": lengths}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/budget-experiment")
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--sft-epochs", type=int, default=10)
    parser.add_argument("--trace-prompts", type=int, default=4000)
    parser.add_argument("--predictor-epochs", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(args.seed)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    task = ReasoningTask(num_train=args.num_train, num_val=args.num_val, style="mixed", min_digits=1, max_digits=3,
                         min_operands=2, max_operands=3, seed=args.seed)

    # 1. the reasoning model
    log("SFT of the tiny model on mixed concise/verbose traces")
    sft = CausalLMModule(ModelSpec(config={"model_type": "llama"}), OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup=0.05),
                         max_new_tokens=0)
    data = SFTDataModule(task=task, max_length=320, batch_size=64)
    pl.Trainer(accelerator=accelerator, devices=1, max_epochs=args.sft_epochs, gradient_clip_val=1.0, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0).fit(sft, data)
    model_dir = sft.export(out / "sft-model")
    model, tokenizer = sft.model.eval(), sft.tokenizer
    model.to("cuda" if torch.cuda.is_available() else "cpu")

    # 2. its own traces, then the predictor
    log("collecting traces with the model itself")
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in task.records("train")[: args.trace_prompts]]
    traces = collect_traces(model, tokenizer, prompts, out / "traces.jsonl", max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, do_sample=True, temperature=1.0)
    finished = [t for t in traces if t["finished"]]
    log(f"{len(traces)} traces, {len(traces) - len(finished)} without </think>, "
        f"accuracy {sum(t.get('correct', False) for t in traces) / len(traces):.3f}, "
        f"mean thinking {sum(t['thinking_length'] for t in finished) / max(1, len(finished)):.1f}")
    log("training the budget predictor")
    module = BudgetPredictorModule(ModelSpec(name_or_path=str(model_dir)),
                                   optimizer=OptimizerConfig(lr=1e-3, warmup=0.05, schedule="constant"),
                                   predictor_path=str(out / "predictor.pt"))
    traces_data = TraceDataModule(train_file=str(out / "traces.jsonl"), max_length=512, batch_size=32, val_fraction=0.05)
    predictor_trainer = pl.Trainer(accelerator=accelerator, devices=1, max_epochs=args.predictor_epochs, gradient_clip_val=1.0,
                                   logger=False, enable_checkpointing=False, enable_progress_bar=False)
    predictor_trainer.fit(module, traces_data)
    predictor_metrics = {k: float(v) for k, v in predictor_trainer.callback_metrics.items()}
    log(f"predictor: {predictor_metrics}")
    predictor = module.predictor.eval().to(model.device)

    # 3. evaluation
    records = task.records("val")
    results = {"predictor": predictor_metrics, "runs": []}
    none = lambda first, n: []  # noqa: E731
    base = evaluate(model, tokenizer, records, none, args.batch_size, args.max_new_tokens)
    results["runs"].append({"method": "unguided", "budget": None, **{k: v for k, v in base.items() if k != "lengths"}})
    mean = base["mean_thinking"]
    log(f"unguided: accuracy {base['accuracy']:.3f}, mean thinking {mean:.1f}")
    # difficulty estimate: predicted length before generating vs the realised unguided length
    enc = tokenizer([r["prompt"] + "<think>" for r in records], return_tensors="pt", padding=True).to(model.device)
    estimate = estimate_thinking_length(model, predictor, enc["input_ids"], enc["attention_mask"]).cpu()
    actual = torch.tensor(base["lengths"], dtype=torch.float32)
    results["difficulty_pearson"] = float(torch.corrcoef(torch.stack([estimate, actual]))[0, 1])
    results["difficulty_mean_abs_error"] = float((estimate - actual).abs().mean())
    log(f"difficulty estimate: pearson {results['difficulty_pearson']:.3f}, MAE {results['difficulty_mean_abs_error']:.1f}")
    for fraction in (0.25, 0.5, 0.75, 1.0):
        budget = max(1, round(fraction * mean))
        forcing = evaluate(model, tokenizer, records, lambda first, n: [BudgetForcing(tokenizer, budget)],
                           args.batch_size, args.max_new_tokens)
        guided = evaluate(model, tokenizer, records,
                          lambda first, n: [BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, budget)],
                          args.batch_size, args.max_new_tokens)
        # Ablation: the reference's trained-row mask off (every candidate keeps its w).
        unmasked = evaluate(model, tokenizer, records,
                            lambda first, n: [BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, budget, min_rate=0.0,
                                                                            min_shape=0.0, min_mode=-1.0)],
                            args.batch_size, args.max_new_tokens)
        for method, run in (("budget forcing", forcing), ("budget guidance", guided),
                            ("budget guidance, no row mask", unmasked)):
            within = sum(length <= budget for length in run["lengths"]) / len(run["lengths"])
            results["runs"].append({"method": method, "fraction": fraction, "budget": budget, "within_budget": within,
                                    **{k: v for k, v in run.items() if k != "lengths"}})
            log(f"{method} @ {fraction:.0%} ({budget} tokens): accuracy {run['accuracy']:.3f}, "
                f"mean thinking {run['mean_thinking']:.1f}, within budget {within:.3f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_table_and_plot(results, out)


def write_table_and_plot(results: dict, out: Path) -> None:
    lines = ["| method | budget (share of unguided mean) | accuracy | mean thinking tokens | within budget |",
             "| --- | --- | --- | --- | --- |"]
    for run in results["runs"]:
        budget = "none" if run["budget"] is None else f"{run['budget']} ({run['fraction']:.0%})"
        within = "" if run["budget"] is None else f"{run['within_budget']:.3f}"
        lines.append(f"| {run['method']} | {budget} | {run['accuracy']:.3f} | {run['mean_thinking']:.1f} | {within} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    base = results["runs"][0]
    ax.scatter([base["mean_thinking"]], [base["accuracy"]], color="black", marker="*", s=120, label="unguided", zorder=3)
    for method, color in (("budget forcing", "tab:orange"), ("budget guidance", "tab:blue"),
                          ("budget guidance, no row mask", "tab:green")):
        runs = [r for r in results["runs"] if r["method"] == method]
        ax.plot([r["mean_thinking"] for r in runs], [r["accuracy"] for r in runs], "o-", color=color, label=method)
        for r in runs:
            ax.annotate(f"{r['fraction']:.0%}", (r["mean_thinking"], r["accuracy"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8, color=color)
    ax.set_xlabel("mean thinking tokens")
    ax.set_ylabel("accuracy")
    ax.set_title("Embedded task, tiny Llama (mixed styles): budgets 25-100%", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "budget_guidance.png", dpi=120)


if __name__ == "__main__":
    main()
