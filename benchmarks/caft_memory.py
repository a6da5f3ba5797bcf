"""Peak memory and step time of one CAFT training step: plain SFT vs CAFT (chunked) vs a naive stacked CAFT.

    OMP_NUM_THREADS=1 python -m benchmarks.caft_memory --device cuda      # GPU: exact peak allocated memory
    OMP_NUM_THREADS=1 python -m benchmarks.caft_memory --device cpu --batch 1

Every variant runs forward + backward of the same Llama (vocab 32k, length 512 by default) in its own
process. ``naive`` stacks the main head's and every head's full-vocabulary logits into one (K+1, B, T, V)
tensor and takes the cross-entropy of each slice, as the reference code does; ``caft`` is
``ConceptAwareFineTuning`` through the token-loss dispatcher (logits only at target positions, in chunks,
recomputed in backward). Memory on CUDA is ``torch.cuda.max_memory_allocated`` above the memory held before
the step (weights, optimizer-free); on CPU it is the growth of the peak resident set size (coarser).
Ratios are against plain SFT measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import add_device_argument, synchronize, timed
from lightning_tokens.lean_loss import IGNORE_INDEX


def build(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                  intermediate_size=args.hidden * 3,
                                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                  num_key_value_heads=args.hidden // 64, max_position_embeddings=args.length,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.to(args.device, dtype=getattr(torch, args.dtype))
    ids = torch.randint(0, args.vocab, (args.batch, args.length), device=args.device)
    labels = ids.clone()
    labels[:, : args.length // 4] = IGNORE_INDEX  # a prompt: only the response is a target
    return model, ids, torch.ones_like(ids), labels


def naive_step(model, heads, ids, mask, labels, beta=0.01, gamma=0.8):
    from lightning_tokens.caft import capture_trunk

    with capture_trunk(model) as holder:
        main = model(input_ids=ids, attention_mask=mask).logits
    stacked = torch.stack([main, *heads(model, holder["trunk"], mask)])  # (K + 1, B, T, V)
    loss = 0.0
    for k in range(stacked.shape[0]):
        shift = 1 + k
        ce = F.cross_entropy(stacked[k, :, :-shift].flatten(0, 1).float(), labels[:, shift:].flatten())
        loss = loss + (ce if k == 0 else beta * gamma ** k * ce)
    return loss


def run_variant(args) -> dict:
    import lightning.pytorch as pl

    from lightning_tokens.caft import ConceptAwareFineTuning, MultiTokenHeads

    torch.set_flush_denormal(True)
    model, ids, mask, labels = build(args)
    model.train()
    holder = pl.LightningModule()
    holder.model = model
    heads = None
    if args.variant == "caft":
        callback = ConceptAwareFineTuning(num_heads=args.heads, chunk_size=args.chunk)
        callback.setup(None, holder, "fit")  # joins the dispatcher and registers the heads, as in a Trainer
        callback.total_steps = 1
    elif args.variant == "naive":
        heads = MultiTokenHeads(model, num_heads=args.heads)

    def step():
        if args.variant == "naive":
            loss = naive_step(model, heads, ids, mask, labels)
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        holder.zero_grad(set_to_none=True)
        if heads is not None:
            heads.zero_grad(set_to_none=True)
        return float(loss)

    cuda = args.device == "cuda"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # on CPU the peak includes the warm-up step
    step()  # warm-up (allocator, kernels)
    synchronize(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    losses = []
    seconds = timed(lambda: losses.append(step()), args.device, args.repeats, warmup=0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return {"variant": args.variant, "peak_mib": peak / 2**20, "step_s": seconds, "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", default=None, help="internal: run one variant in this process")
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in ("plain", "caft", "naive"):
        command = [sys.executable, "-m", __spec__.name, *sys.argv[1:], "--variant", variant]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            rows.append({"variant": variant, "error": result.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    plain = rows[0]
    print(f"device={args.device} dtype={args.dtype} vocab={args.vocab} length={args.length} batch={args.batch} "
          f"hidden={args.hidden} layers={args.layers} heads={args.heads} chunk={args.chunk}")
    print("| variant | peak MiB | x plain | step s | x plain |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | error: {row['error']} | | | |")
            continue
        print(f"| {row['variant']} | {row['peak_mib']:.0f} | {row['peak_mib'] / plain['peak_mib']:.2f} | "
              f"{row['step_s']:.3f} | {row['step_s'] / plain['step_s']:.2f} |")


if __name__ == "__main__":
    main()
