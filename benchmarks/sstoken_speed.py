"""Step time and peak memory of TokenSelection per history option, as ratios to plain SFT on the same batches.

Every variant trains the same model on the same fixed batches (one warm-up pass, then timed steps); plain SFT
is measured in the same run. LoRA variants share one LoRA model (plain SFT, history "base" = adapters
disabled, "ema", "precomputed", and attention only); full fine-tuning variants share one full model (plain
SFT, a frozen bf16 copy, a frozen int8 copy). With ``--rounds R`` the LoRA variants are measured R times in
turn and each reports the median over its rounds, so that a slow drift of the machine hits them all alike.

    # GPU, a Qwen2.5-1.5B-shaped model built from config (random weights, nothing downloaded)
    python -m benchmarks.sstoken_speed --size 1.5b --batch 4 --length 1024
    # CPU: a small model of the same head layout
    python -m benchmarks.sstoken_speed --size small --device cpu --batch 4 --length 512 --steps 2 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.common import add_device_argument, synchronize
from lightning_tokens.lean_loss import IGNORE_INDEX
from lightning_tokens.modeling import enable_activation_checkpointing
from lightning_tokens.sstoken import TokenSelection
from lightning_tokens.sstoken.precompute import score_dataloader

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    # a CPU-sized model with Qwen2.5's head layout (12 query heads sharing 2 key heads)
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
    # Qwen2.5-1.5B's shape
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def batches(n, batch, length, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        prompt = length // 4
        labels[:, :prompt] = IGNORE_INDEX
        # ragged ends: the last rows are right-padded
        for row in range(1, batch):
            cut = length - row * length // (4 * batch)
            mask[row, cut:] = 0
            labels[row, cut:] = IGNORE_INDEX
        out.append({k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()})
    return out


def build(size, device, dtype, lora, checkpointing=False):
    config = AutoConfig.for_model("qwen2", **SIZES[size])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if checkpointing:
        enable_activation_checkpointing(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    return model.train()


def measure(model, data, steps, callback=None):
    """Step times (after one untimed pass over ``data``) and peak CUDA memory of ``steps`` training steps."""
    device = data[0]["input_ids"].device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if callback is not None:
        callback.attach(model)
    times = []
    try:  # not common.timed: a warm-up pass over every batch, then the peak reset, and the steps cycle the batches
        for step in range(len(data) + steps):
            batch = data[step % len(data)]
            synchronize(device)
            if device.type == "cuda" and step == len(data):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if callback is not None and callback.source is not None:
                callback.source.after_optimizer_step(model)
            synchronize(device)
            if step >= len(data):
                times.append(time.perf_counter() - start)
    finally:
        if callback is not None:
            callback.detach()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times, peak


def interleaved(model, data, steps, rounds, variants):
    """Median step time and largest peak of each variant, measured in ``rounds`` rounds of every variant.

    Interleaving spreads slow drifts of the machine (other processes, clocks) over all variants alike.
    ``variants`` maps a name to a factory of a fresh callback (or to ``None`` for plain SFT).
    """
    times = {name: [] for name in variants}
    peaks = {name: 0.0 for name in variants}
    for _ in range(rounds):
        for name, factory in variants.items():
            callback = factory() if factory else None
            step_times, peak = measure(model, data, steps, callback)
            times[name] += step_times
            peaks[name] = peak if math.isnan(peak) else max(peaks[name], peak)  # NaN on the CPU
    return {name: (statistics.median(times[name]), peaks[name]) for name in variants}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.5b", choices=sorted(SIZES))
    add_device_argument(parser)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all LoRA variants (interleaved)")
    parser.add_argument("--full", action="store_true", help="also the full fine-tuning variants")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (as the QLoRA configs)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = batches(3, args.batch, args.length, SIZES[args.size]["vocab_size"], device)
    results = []

    def report(group, name, value, baseline):
        row = dict(group=group, variant=name, step_s=value[0], peak_gib=value[1] / 2**30,
                   time_ratio=value[0] / baseline[0], memory_ratio=value[1] / baseline[1])
        results.append(row)
        print(f"{group:5s} {name:32s} step {value[0]*1e3:8.1f} ms ({row['time_ratio']:.3f}x)  "
              f"peak {row['peak_gib']:7.2f} GiB ({row['memory_ratio']:.3f}x)", flush=True)

    model = build(args.size, device, dtype, lora=True, checkpointing=args.checkpointing)
    table_path = "/tmp/selection_bench_history.pt"
    score_dataloader(model, data, device).save(table_path)
    variants = {
        "plain SFT": None,
        "base (adapters disabled)": lambda: TokenSelection(warmup=0, history="base"),
        "ema": lambda: TokenSelection(warmup=0, history="ema"),
        "precomputed": lambda: TokenSelection(warmup=0, history="precomputed", history_file=table_path),
        "attention only": lambda: TokenSelection(warmup=0, mode="attention"),
        "loss only, base": lambda: TokenSelection(warmup=0, mode="loss", history="base"),
    }
    measured = interleaved(model, data, args.steps, args.rounds, variants)
    plain = measured["plain SFT"]
    for name, value in measured.items():
        report("lora", name, value, plain)
    del model
    if args.full:
        model = build(args.size, device, dtype, lora=False, checkpointing=args.checkpointing)
        times, peak = measure(model, data, args.steps)
        plain = statistics.median(times), peak
        report("full", "plain SFT", plain, plain)
        variants = [("base (frozen copy)", {})]
        try:
            import bitsandbytes  # noqa: F401

            variants.append(("base (frozen int8 copy)", dict(history_quantization="int8")))
        except ImportError:
            print("bitsandbytes is not installed: no int8 copy")
        for name, kwargs in variants:
            times, peak = measure(model, data, args.steps, TokenSelection(warmup=0, **kwargs))
            report("full", name, (statistics.median(times), peak), plain)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(args=vars(args), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
