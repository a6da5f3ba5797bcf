"""Step time and peak memory of TokenSelection per history option, as ratios to plain SFT on the same batches.

Every variant trains the same model on the same fixed batches (one warm-up pass, then timed steps); plain SFT
is measured in the same run. LoRA variants share one LoRA model (plain SFT, history "base" = adapters
disabled, "ema", "precomputed", and attention only); full fine-tuning variants share one full model (plain
SFT, a frozen bf16 copy, a frozen int8 copy).

    # GPU, a Qwen2.5-1.5B-shaped model built from config (random weights, nothing downloaded)
    python benchmarks/selection_bench.py --size 1.5b --batch 4 --length 1024
    # CPU smoke run
    OMP_NUM_THREADS=1 python benchmarks/selection_bench.py --size tiny --device cpu --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens.selection import TokenSelection
from lightning_tokens.selection.scoring import score_dataloader

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
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
        labels[:, :prompt] = -100
        # ragged ends: the last rows are right-padded
        for row in range(1, batch):
            cut = length - row * length // (4 * batch)
            mask[row, cut:] = 0
            labels[row, cut:] = -100
        out.append({k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()})
    return out


def build(size, device, dtype, lora):
    config = AutoConfig.for_model("qwen2", **SIZES[size])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    return model.train()


def measure(model, data, steps, callback=None):
    device = data[0]["input_ids"].device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if callback is not None:
        callback.attach(model)
    times = []
    try:
        for step in range(len(data) + steps):
            batch = data[step % len(data)]
            if device.type == "cuda":
                torch.cuda.synchronize()
                if step == len(data):
                    torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if callback is not None and callback.source is not None:
                callback.source.after_optimizer_step(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= len(data):
                times.append(time.perf_counter() - start)
    finally:
        if callback is not None:
            callback.detach()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.5b", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="also the full fine-tuning variants")
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

    model = build(args.size, device, dtype, lora=True)
    table_path = "/tmp/selection_bench_history.pt"
    score_dataloader(model, data, device).save(table_path)
    plain = measure(model, data, args.steps)
    report("lora", "plain SFT", plain, plain)
    variants = [
        ("base (adapters disabled)", dict(history="base")),
        ("ema", dict(history="ema")),
        ("precomputed", dict(history="precomputed", history_file=table_path)),
        ("attention only", dict(mode="attention")),
        ("loss only, base", dict(mode="loss", history="base")),
    ]
    for name, kwargs in variants:
        callback = TokenSelection(warmup=0, **kwargs)
        result = measure(model, data, args.steps, callback)
        nll = getattr(callback.source, "nll", None)
        report("lora", name + (" [head on targets only]" if nll is not None and nll.chunked else ""), result, plain)
    plain_again = measure(model, data, args.steps)
    report("lora", "plain SFT (again)", plain_again, plain)
    del model
    if args.full:
        model = build(args.size, device, dtype, lora=False)
        plain = measure(model, data, args.steps)
        report("full", "plain SFT", plain, plain)
        variants = [("base (frozen copy)", {})]
        try:
            import bitsandbytes  # noqa: F401

            variants.append(("base (frozen int8 copy)", dict(history_quantization="int8")))
        except ImportError:
            print("bitsandbytes is not installed: no int8 copy")
        for name, kwargs in variants:
            report("full", name, measure(model, data, args.steps, TokenSelection(warmup=0, **kwargs)), plain)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(args=vars(args), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
