"""Experiment: does token selection help when 30% of the training responses are corrupted?

Trains the tiny Llama of ``configs/sstoken/tiny.yaml`` on the embedded task (30% of training responses with
25% of their units corrupted; clean validation) for the same number of steps with: full SFT, ssToken,
loss only (gamma 1), attention only (gamma 0) and random selection (rho 0.6 everywhere); three seeds each
(model initialisation and data order; the data set is fixed). Reports held-out exact match (greedy), and,
as a diagnostic, how often each method keeps the corrupted tokens of noisy responses compared with their
intact tokens (a method that filters noise keeps corrupted tokens less often than 0.6).

    python benchmarks/selection_experiment.py --jobs 15 --output runs/selection_experiment
    python benchmarks/selection_experiment.py --methods sft,sstoken --seeds 0 --epochs 1   # quick look
    python benchmarks/selection_experiment.py --jobs 15 --pretrain_epochs 3 --output runs/selection_pretrained
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("sft", "sstoken", "loss", "attention", "random", "sstoken_ema")
TASK = dict(num_train=6000, num_val=200, min_digits=1, max_digits=2, min_operands=2, max_operands=2,
            noise=0.25, noisy_fraction=0.3, seed=0)


def corrupted_masks(tokenizer) -> dict[str, list[bool]]:
    """For each noisy training sample (by content key): which of its target tokens differ from the clean text."""
    from lightning_tokens.data.encode import encode_record
    from lightning_tokens.data.reasoning_task import ReasoningTask
    from lightning_tokens.data.records import from_dicts
    from lightning_tokens.selection.scoring import sample_key

    noisy = from_dicts(ReasoningTask(**TASK).records("train"), "noisy")
    clean = from_dicts(ReasoningTask(**{**TASK, "noise": 0.0}).records("train"), "clean")
    masks = {}
    for n, c in zip(noisy, clean):
        if n.fields["completion"] == c.fields["completion"]:
            continue
        a, b = encode_record(tokenizer, n), encode_record(tokenizer, c)
        if len(a.input_ids) != len(b.input_ids):
            continue  # a replaced word tokenizes differently: positions do not line up, leave it out
        targets = [i for i, label in enumerate(a.labels) if label != -100]
        masks[sample_key(a.input_ids, a.labels)] = [a.input_ids[i] != b.input_ids[i] for i in targets]
    return masks


def run_one(method: str, seed: int, epochs: int, out: Path, pretrain_epochs: int = 0) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig, ReasoningTask, SFTDataModule
    from lightning_tokens.selection import TokenSelection
    from lightning_tokens.selection.scoring import row_keys
    from lightning_tokens.token_loss import TokenLossCallback

    class NoiseAudit(TokenLossCallback):
        """Counts kept corrupted and kept intact target tokens of noisy samples (runs after the selection)."""

        def __init__(self, masks, classes):
            super().__init__()
            self.masks, self.counts = masks, dict(corrupt=0, corrupt_kept=0, intact=0, intact_kept=0)
            self.classes = classes  # name -> token ids; kept rate of each class of target token
            self.by_class = {name: [0, 0] for name in classes}

        def reshape_token_loss(self, ctx):
            keys = row_keys(ctx.input_ids, ctx.attention_mask, ctx.labels)
            kept = (ctx.weights > 0).cpu()
            targets = ctx.target_mask.cpu()
            next_ids = ctx.input_ids[:, 1:].cpu()
            for name, ids in self.classes.items():
                is_class = torch.isin(next_ids, torch.tensor(ids)) & targets
                self.by_class[name][0] += int(is_class.sum())
                self.by_class[name][1] += int((is_class & kept).sum())
            for row, key in enumerate(keys):
                mask = self.masks.get(key)
                if mask is None:
                    continue
                row_kept = kept[row][targets[row]].tolist()
                for bad, keep in zip(mask, row_kept):
                    name = "corrupt" if bad else "intact"
                    self.counts[name] += 1
                    self.counts[name + "_kept"] += int(keep)

    pl.seed_everything(seed)
    torch.set_float32_matmul_precision("high")
    module = CausalLMModule(model=ModelSpec(config={"model_type": "llama"}, seed=seed),
                            optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup=0.05, schedule="cosine"),
                            max_new_tokens=64)
    data = SFTDataModule(task=ReasoningTask(**TASK), max_length=128, batch_size=32, eval_batch_size=100, seed=seed)
    if pretrain_epochs:
        # A "pretrained" base, as in the paper's setting: plain training on other, clean problems first. The
        # history model (frozen copy taken when the noisy fine-tuning starts) is then this model.
        clean = SFTDataModule(task=ReasoningTask(**{**TASK, "noise": 0.0, "seed": 1, "num_train": 2000}),
                              max_length=128, batch_size=32, seed=seed)
        pl.Trainer(max_epochs=pretrain_epochs, accelerator="auto", devices=1, gradient_clip_val=1.0, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0).fit(module, datamodule=clean)
    callbacks = []
    if method == "sstoken_ema":  # ssToken with an EMA history model instead of the frozen base
        callbacks.append(TokenSelection(history="ema", seed=seed))
    elif method != "sft":
        callbacks.append(TokenSelection(mode=method, seed=seed))
    tok = module.tokenizer
    digits = tok.convert_tokens_to_ids([str(d) for d in range(10)])
    classes = {"eos": [tok.eos_token_id], "</think>": tok.convert_tokens_to_ids(["</think>"]), "digits": digits,
               "newline": tok("\n", add_special_tokens=False)["input_ids"]}
    audit = NoiseAudit(corrupted_masks(tok), classes)
    callbacks.append(audit)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", devices=1, precision="32-true", gradient_clip_val=1.0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=epochs,
                         callbacks=callbacks)
    started = time.time()
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    c = audit.counts
    result = dict(method=method, seed=seed, epochs=epochs, pretrain_epochs=pretrain_epochs, steps=trainer.global_step,
                  exact_match=metrics.get("val/exact_match"), val_loss=metrics.get("val/loss"),
                  kept_corrupt=c["corrupt_kept"] / max(1, c["corrupt"]), kept_intact=c["intact_kept"] / max(1, c["intact"]),
                  corrupt_tokens=c["corrupt"], seconds=time.time() - started,
                  kept_by_class={k: v[1] / max(1, v[0]) for k, v in audit.by_class.items()},
                  selection={k: v for k, v in metrics.items() if k.startswith("selection/")})
    (out / f"{method}-{seed}.json").write_text(json.dumps(result, indent=1))
    return result


def summarise(results: list[dict]) -> str:
    lines = ["| method | exact match (mean ± sd over seeds) | per seed | val loss | kept corrupted / kept intact tokens of noisy responses |",
             "|---|---|---|---|---|"]
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        em = [100 * r["exact_match"] for r in rows]
        sd = statistics.stdev(em) if len(em) > 1 else 0.0
        loss = statistics.mean(r["val_loss"] for r in rows)
        kc = statistics.mean(r["kept_corrupt"] for r in rows)
        ki = statistics.mean(r["kept_intact"] for r in rows)
        lines.append(f"| {method} | {statistics.mean(em):.1f} ± {sd:.1f} | {', '.join(f'{e:.1f}' for e in em)} | "
                     f"{loss:.3f} | {kc:.3f} / {ki:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS[:5]))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrain_epochs", type=int, default=0,
                        help="first train on 2000 other, clean problems for this many epochs (a pretrained base)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (separate processes)")
    parser.add_argument("--output", default="runs/selection_experiment")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # method:seed, run inside a worker
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        method, seed = args.one.split(":")
        run_one(method, int(seed), args.epochs, out, args.pretrain_epochs)
        return
    todo = [(m, int(s)) for s in args.seeds.split(",") for m in args.methods.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[subprocess.Popen] = []
    for method, seed in todo:
        while len(running) >= args.jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(1)
        command = [sys.executable, __file__, "--one", f"{method}:{seed}", "--epochs", str(args.epochs),
                   "--pretrain_epochs", str(args.pretrain_epochs), "--output", str(out)]
        log = open(out / f"{method}-{seed}.log", "w")
        running.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    for process in running:
        process.wait()
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    table = summarise(results)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
