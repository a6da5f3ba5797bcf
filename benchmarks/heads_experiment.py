"""CAFT on the embedded reasoning task: next-token fine-tuning vs CAFT with stage-1 heads, same steps, several seeds.

    OMP_NUM_THREADS=1 python benchmarks/heads_experiment.py --out runs/heads-experiment

1. Base model: a tiny Llama (128 wide, 4 layers) trained with plain SFT on the ``easy`` preset (1-2 digits, 2
   operands), then exported: it stands in for a pre-trained model.
2. Stage 1: the base model answers ``easy`` prompts itself (self-distillation, greedy); 4 layer heads are
   trained on those answers with the base frozen.
3. Stage 2: from the base, fine-tune on ``--target`` (default the ``medium`` preset: 2-3 digits, 2-3 operands;
   ``--style`` sets the solution format, fresh problems either way) with plain next-token
   loss or with ``ConceptAwareFineTuning`` (paper defaults unless ``--beta`` is given), same data order, same
   steps, for each seed; held-out exact match by greedy generation on ``--num-val`` medium problems.

Steps 1 and 2 are cached under ``--out``. Prints a markdown table (mean, standard deviation, per seed).

``--layers`` and ``--hidden`` size the base (default 4 and 128, the tiny Llama above; the attention heads
are 32 wide, the MLP 2.75x); a cached base of another size is refused. ``--architecture resblock`` trains
Medusa resblock heads instead, into ``heads-resblock/`` (layer heads stay in ``heads/``) on the same base and
distilled answers. ``benchmarks/heads_speculative.py --prepare`` builds base and heads through these functions.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.heads import ConceptAwareFineTuning, MultiTokenHeadsModule, self_distill
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.module import CausalLMModule
from lightning_tokens.optim import OptimizerConfig


def trainer(steps: int, callbacks=(), val: bool = False) -> pl.Trainer:
    return pl.Trainer(accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1.0 if val else 0, callbacks=list(callbacks), gradient_clip_val=1.0)


def base_config(layers: int = 4, hidden: int = 128) -> dict:
    """Config of a tiny Llama base; the defaults give exactly ``TINY_DEFAULTS["llama"]``."""
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4, "num_attention_heads": hidden // 32,
            "num_key_value_heads": max(1, hidden // 64)}


def base_model(out: str, steps: int, layers: int = 4, hidden: int = 128) -> Path:
    """The base under ``out/base``: trained with plain SFT on ``easy`` for ``steps`` steps, or reused if there."""
    path = Path(out) / "base"
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        found = (config["num_hidden_layers"], config["hidden_size"])
        if found != (layers, hidden):
            raise SystemExit(f"{path} holds a base of {found[0]} layers x {found[1]} wide, not the requested "
                             f"{layers} x {hidden}: pick another --out")
        return path
    pl.seed_everything(1000)
    module = CausalLMModule(ModelSpec(config=base_config(layers, hidden), seed=1000),
                            OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup=0.05), max_new_tokens=0)
    data = SFTDataModule(task=ReasoningTask.preset("easy", num_train=steps * 32, num_val=8, seed=1000),
                         max_length=256, batch_size=32)
    trainer(steps).fit(module, datamodule=data)
    return module.export(path)


def heads_dir(out: str, architecture: str = "layer") -> Path:
    """Where stage-1 heads of ``architecture`` live: ``heads/`` for layer heads, ``heads-<architecture>/`` else."""
    return Path(out) / ("heads" if architecture == "layer" else f"heads-{architecture}")


def stage1_file(out: str, architecture: str = "layer") -> Path:
    """Held-out head accuracy of stage 1: ``stage1.json`` for layer heads, ``stage1-<architecture>.json`` else."""
    return Path(out) / ("stage1.json" if architecture == "layer" else f"stage1-{architecture}.json")


def stage1_heads(out: str, base: Path, distill: int, steps: int, architecture: str = "layer") -> Path:
    """4 heads of ``architecture`` trained ``steps`` steps on ``distill`` self-distilled answers of the base
    (``out/distilled.jsonl``, shared by all architectures), or reused if there; see :func:`stage1_file`."""
    path = heads_dir(out, architecture)
    if (path / "heads.safetensors").is_file():
        return path
    spec = ModelSpec(name_or_path=str(base))
    module = MultiTokenHeadsModule(spec, num_heads=4, architecture=architecture,
                                   optimizer=OptimizerConfig(lr=1e-3, warmup=0.05), heads_path=str(path))
    records = ReasoningTask.preset("easy", num_train=distill, num_val=8, seed=2000).records("train")
    distilled = Path(out) / "distilled.jsonl"
    if not distilled.is_file():
        module.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self_distill(module.model, module.tokenizer, [r["prompt"] for r in records], distilled,
                     max_new_tokens=96, batch_size=128)
    pl.seed_everything(2000)
    data = SFTDataModule(train_file=str(distilled), val_fraction=0.05, max_length=256, batch_size=32)
    run = trainer(steps, val=True)
    run.fit(module, datamodule=data)
    run.validate(module, datamodule=data, verbose=False)
    accuracy = {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("val/head") and k.endswith("_acc")}
    stage1_file(out, architecture).write_text(json.dumps(accuracy, indent=2))
    return path


def finetune(args, base: Path, heads: Path, seed: int, caft: bool) -> float:
    pl.seed_everything(seed)
    module = CausalLMModule(ModelSpec(name_or_path=str(base)), OptimizerConfig(lr=args.lr, weight_decay=0.01, warmup=0.05),
                            max_new_tokens=200)
    data = SFTDataModule(task=ReasoningTask.preset(args.target, num_train=args.ft_steps * 32, num_val=args.num_val,
                                                   seed=4000, style=args.style),
                         max_length=256, batch_size=32, eval_batch_size=128, seed=seed)
    callbacks = [ConceptAwareFineTuning(heads_path=str(heads), beta=args.beta)] if caft else []
    run = trainer(args.ft_steps, callbacks, val=True)
    run.fit(module, datamodule=data)
    for callback in callbacks:
        run.callbacks.remove(callback)  # score the plain model: validation is plain next-token anyway
    metrics = run.validate(module, datamodule=data, verbose=False)[0]
    return float(metrics["val/exact_match"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/heads-experiment")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--distill", type=int, default=4096, help="self-distilled stage-1 samples")
    parser.add_argument("--heads-steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the base")
    parser.add_argument("--hidden", type=int, default=128, help="width of the base (a multiple of 64)")
    parser.add_argument("--architecture", default="layer", choices=["layer", "resblock"],
                        help="stage-1 heads used by CAFT")
    parser.add_argument("--ft-steps", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--target", default="medium", help="task preset of stage 2: easy, medium or hard")
    parser.add_argument("--style", default="concise", help="solution style of stage 2: concise, verbose or mixed")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = base_model(args.out, args.base_steps, args.layers, args.hidden)
    heads = stage1_heads(args.out, base, args.distill, args.heads_steps, args.architecture)
    results = {"ntp": [], "caft": []}
    for seed in args.seeds:
        for name in ("ntp", "caft"):
            results[name].append(finetune(args, base, heads, seed, name == "caft"))
            print(name, seed, results[name][-1], flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"stage 1 held-out head accuracy: {stage1_file(args.out, args.architecture).read_text()}")
    print("| fine-tuning | exact match mean | std | per seed |")
    print("| --- | --- | --- | --- |")
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.3f} | {spread:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
