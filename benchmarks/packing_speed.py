"""Real (non-padding) tokens per second of SFT training steps: packed rows and padding-free batches against padded.

    OMP_NUM_THREADS=2 python benchmarks/packing_speed.py                  # CPU, every length distribution
    python benchmarks/packing_speed.py --device cuda --dtype bfloat16 --hidden 1024 --layers 8

Three layouts: ``padded`` (8 samples padded to the longest), ``padding_free`` (the same 8 samples packed into
rows, ``SFTDataModule(padding_free=True)``) and ``packed`` (8 rows of up to ``max_length`` tokens,
``SFTDataModule(packing=True)``). Three length distributions:

- ``embedded``: the embedded reasoning task at 1-4 digits, 2-4 operands, mixed thinking styles, through
  ``SFTDataModule`` itself (``packing=False`` / ``True``, ``max_length`` 512);
- ``easy``: the embedded task's defaults (1-2 digits, 2 operands, concise), the same way;
- ``lognormal``: synthetic samples like an instruction set: lengths lognormal with median 200 tokens
  (sigma 0.8), cut to 16..2,048, the first 30% prompt; packed into rows of 2,048.

A step is what ``CausalLMModule`` runs: forward through the loss dispatcher (``PlainLoss``, the lean loss),
backward, AdamW. Each layout gets one warm-up step, then ``--steps`` timed steps over the same samples in the
same order; the figure is real tokens over the timed steps' wall time, and the speed-ups are over padded,
measured in the same run. The padding share is of the token slots the model computed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from benchmarks.common import add_device_argument, ratio, synchronize
from lightning_tokens.data.encode import Encoded, SFTCollator
from lightning_tokens.data.packing import (
    PackedCollator,
    PackedRows,
    PaddingFreeCollator,
    model_inputs,
    real_token_count,
)
from lightning_tokens.lean_loss import IGNORE_INDEX


def embedded_samples(tokenizer, easy: bool = False) -> tuple[list, int]:
    from lightning_tokens import ReasoningTask, SFTDataModule

    mixed = dict(min_digits=1, max_digits=4, min_operands=2, max_operands=4, style="mixed")
    task = ReasoningTask(num_train=2000, num_val=0, **({} if easy else mixed))
    data = SFTDataModule(task=task, max_length=512, val_fraction=0)
    data.tokenizer = tokenizer
    data.setup("fit")
    return [sample for sample, _ in data.train_dataset], 512


def lognormal_samples(vocab: int, count: int = 600, seed: int = 0) -> tuple[list, int]:
    generator = random.Random(seed)
    samples = []
    for i in range(count):
        length = min(2048, max(16, round(math.exp(generator.gauss(math.log(200), 0.8)))))
        prompt = max(1, int(0.3 * length))
        ids = [generator.randrange(3, vocab) for _ in range(length)]
        samples.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt, f"synthetic {i}"))
    return samples, 2048


def batches(samples: list, max_length: int, layout: str, batch_size: int, seed: int, pad_id: int) -> list[dict]:
    """Every batch of one epoch over ``samples`` in a seeded order, in ``layout``; padded and padding-free batches
    hold the same samples."""
    packed = layout == "packed"
    items = PackedRows(samples, max_length) if packed else samples
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    collate = {"packed": PackedCollator(pad_id), "padded": SFTCollator(pad_id),
               "padding_free": PaddingFreeCollator(PackedCollator(pad_id), max_length)}[layout]
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([items[i] if packed else (items[i], None) for i in group]) for group in groups]


def slots(batch: dict) -> int:
    return batch["input_ids"].numel()


def run(model, optimizer, data: list[dict], steps: int, device: torch.device) -> dict:
    def step(batch):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step(data[0])  # warm-up
    timed = data[1:1 + steps]
    synchronize(device)
    started = time.perf_counter()  # one clock over different batches (real tokens / total time), not common.timed
    for batch in timed:
        step(batch)
    synchronize(device)
    elapsed = time.perf_counter() - started
    tokens = sum(int(real_token_count(b)) for b in timed)
    total = sum(slots(b) for b in timed)
    return {"steps": len(timed), "seconds": elapsed, "real_tokens": tokens, "tokens_per_s": tokens / elapsed,
            "padding_share": 1 - tokens / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["embedded", "easy", "lognormal", "all"], default="all")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per layout (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    add_device_argument(parser, "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_tokens.data.tokenizer import load_task_tokenizer
    from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokenizer = load_task_tokenizer()
    vocab = len(tokenizer)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                  num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                  num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4096)
    config._attn_implementation = args.attention
    print(f"# llama hidden {args.hidden} x {args.layers} layers, vocabulary {vocab}, {args.device} {args.dtype}, "
          f"{args.attention}, batch {args.batch}, {args.steps} timed steps per layout", flush=True)
    kinds = ["embedded", "easy", "lognormal"] if args.data == "all" else [args.data]
    for kind in kinds:
        if kind == "lognormal":
            samples, max_length = lognormal_samples(vocab)
        else:
            samples, max_length = embedded_samples(tokenizer, easy=kind == "easy")
        results = {}
        for layout in ("padded", "padding_free", "packed"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).train()
            TokenLossDispatcher.for_model(model).add(PlainLoss())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            data = batches(samples, max_length, layout, args.batch, 0, tokenizer.pad_token_id)
            results[layout] = run(model, optimizer, data, args.steps, device)
            print(json.dumps({"data": kind, "layout": layout, **results[layout]}), flush=True)
        padded = results["padded"]
        for layout in ("padding_free", "packed"):
            other = results[layout]
            print(f"{kind}: padding {padded['padding_share']:.1%} padded, {other['padding_share']:.1%} {layout}; "
                  f"real tokens/s {padded['tokens_per_s']:.0f} -> {other['tokens_per_s']:.0f}: "
                  f"{layout}/padded = {ratio(other['tokens_per_s'], padded['tokens_per_s'])}", flush=True)


if __name__ == "__main__":
    main()
