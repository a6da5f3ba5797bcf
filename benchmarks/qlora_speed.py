"""Peak GPU memory and training throughput of `sft/qwen2.5-1.5b-qlora`, against bf16 LoRA.

The YAML runs as written (nf4 base, double quantization, LoRA r=64 on all linear layers, gradient
checkpointing, paged 8-bit AdamW, bf16, batch 8 x accumulate 4, the embedded task at 2-4 digits), with two
changes so that nothing is downloaded: the model is built from a Qwen2.5-1.5B-shaped config (random weights,
vocabulary 151,936) and the embedded tokenizer is used. The baseline is the same YAML with an unquantized
bf16 base and plain AdamW, in its own process, in the same run. Validation and checkpoints are off; the first
``--warmup`` optimizer steps are not timed.

    python -m benchmarks.qlora_speed --steps 40       # on one GPU, about 3 minutes
    python -m benchmarks.qlora_speed --smoke          # CPU check of the script: a 2-layer model, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIG = "sft/qwen2.5-1.5b-qlora"
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000)
QWEN_1_5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
VARIANTS = {
    "qlora-nf4 (the YAML)": {},
    "lora-bf16 (baseline)": {"quantization": None, "optimizer": "adamw"},
}


def config_file(changes: dict, overrides: dict) -> str:
    """The YAML with the model built from ``QWEN_1_5B`` and ``changes`` applied, written to a temporary file."""
    import tempfile

    import yaml

    from lightning_tokens.cli.configs import resolve_config

    with open(resolve_config(CONFIG)) as f:
        config = yaml.safe_load(f)
    model = config["model"]["init_args"]
    model["model"].pop("name_or_path")
    model["model"]["config"] = {**QWEN_1_5B, **overrides}
    if "quantization" in changes:
        model["model"]["quantization"] = changes["quantization"]
    if "optimizer" in changes:
        model["optimizer"]["name"] = changes["optimizer"]
    config["data"]["init_args"]["task"]["num_train"] = 4000
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    return f.name


def measure(changes: dict, steps: int, warmup: int, smoke: bool = False) -> dict:
    import torch
    from lightning.pytorch import Callback

    from benchmarks.common import synchronize
    from lightning_tokens.cli import build_cli

    device = "cpu" if smoke else "cuda"

    class Meter(Callback):  # times a window of optimizer steps inside one fit, so not common.timed
        def __init__(self) -> None:
            self.tokens, self.started, self.finished = 0, None, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == warmup and self.started is None:
                synchronize(device)
                self.started = time.perf_counter()
            elif self.started is not None:
                self.tokens += int(batch["attention_mask"].sum())
            if trainer.global_step == warmup + steps and self.finished is None:
                synchronize(device)
                self.finished = time.perf_counter()

    args = ["--config", config_file(changes, SMOKE if smoke else {}), f"--trainer.max_steps={warmup + steps}",
            "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--checkpoint.save_last=false"]
    if smoke:
        args += ["--trainer.accelerator=cpu", "--data.init_args.task.num_train=300"]
    try:
        cli = build_cli(args, run=False)
    finally:
        os.unlink(args[1])
    meter = Meter()
    cli.trainer.callbacks.append(meter)
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = meter.finished - meter.started
    peak = float("nan") if smoke else torch.cuda.max_memory_allocated() / 2**30
    return {"peak_gib": peak, "tokens_per_sec": meter.tokens / seconds,
            "seconds_per_step": seconds / steps,
            "trainable": sum(p.numel() for p in cli.model.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--smoke", action="store_true", help="CPU check: a 2-layer model, 2 + 1 steps")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 2, 1
    if args.measure:
        print(json.dumps(measure(VARIANTS[args.measure], args.steps, args.warmup, args.smoke)))
        return
    rows = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--measure", name, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), *(["--smoke"] if args.smoke else [])],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-4000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    device = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}; {args.steps} timed optimizer steps "
          f"(batch 8 x accumulate 4) after {args.warmup}")
    print("| variant | peak GPU memory (GiB) | tokens/s | s per optimizer step | memory ratio | throughput ratio |")
    print("|---|---|---|---|---|---|")
    base = rows["lora-bf16 (baseline)"]
    for name, row in rows.items():
        print(f"| {name} | {row['peak_gib']:.2f} | {row['tokens_per_sec']:.0f} | {row['seconds_per_step']:.3f} | "
              f"{row['peak_gib'] / base['peak_gib']:.3f} | {row['tokens_per_sec'] / base['tokens_per_sec']:.3f} |")


if __name__ == "__main__":
    main()
