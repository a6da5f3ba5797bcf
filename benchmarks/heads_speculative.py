"""Tokens per second of self-speculative decoding with stage-1 heads vs plain greedy ``generate``, batch 1.

    OMP_NUM_THREADS=1 python benchmarks/heads_experiment.py --out runs/heads-experiment   # base + heads
    OMP_NUM_THREADS=1 python benchmarks/heads_speculative.py --out runs/heads-experiment

Both decoders run greedy on the same held-out prompts of the embedded task (the preset the heads were trained
on), one prompt at a time; every output is checked to be identical. Reports tokens per second of each, their
ratio, the heads' acceptance rate and the tokens produced per model forward.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.heads import MultiTokenHeads, generate_with_heads
from lightning_tokens.data.encode import prompt_ids
from lightning_tokens.modeling import ModelSpec, load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/heads-experiment")
    parser.add_argument("--preset", default="easy")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-draft", type=int, nargs="+", default=None, help="drafts per round (default: 1..K)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    model, tokenizer = load_causal_lm(ModelSpec(name_or_path=f"{args.out}/base"))
    model.to(args.device).eval()
    heads = MultiTokenHeads.load(f"{args.out}/heads", model).to(args.device).eval()
    records = ReasoningTask.preset(args.preset, num_train=1, num_val=args.prompts, seed=3000).records("val")
    prompts = [torch.tensor([prompt_ids(tokenizer, r["prompt"])], device=args.device) for r in records]
    eos = tokenizer.eos_token_id

    def plain(ids):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)

    drafts = args.num_draft or list(range(1, heads.num_heads + 1))

    def drafted(ids, num_draft):
        return generate_with_heads(model, heads, ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                   num_draft=num_draft)

    plain(prompts[0]), drafted(prompts[0], drafts[-1])  # warm-up
    timings = {name: 0.0 for name in ["plain", *drafts]}
    counts = {n: dict(drafted=0, accepted=0, forwards=0) for n in drafts}
    tokens, same = 0, 0
    for ids in prompts:  # the decoders alternate prompt by prompt, so machine load hits them alike
        start = time.perf_counter()
        reference = plain(ids)
        timings["plain"] += time.perf_counter() - start
        tokens += reference.shape[1] - ids.shape[1]
        for n in drafts:
            start = time.perf_counter()
            output, stats = drafted(ids, n)
            timings[n] += time.perf_counter() - start
            same += int(torch.equal(output, reference))
            for key in counts[n]:
                counts[n][key] += getattr(stats, key)
    plain_tps = tokens / timings["plain"]
    print(f"device={args.device} prompts={len(prompts)} tokens={tokens} "
          f"identical={same}/{len(prompts) * len(drafts)}")
    print("| decoder | tokens/s | x plain | acceptance | tokens/forward |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| plain greedy generate | {plain_tps:.0f} | 1.00 | - | 1.00 |")
    for n in drafts:
        tps, c = tokens / timings[n], counts[n]
        print(f"| generate_with_heads, {n} draft(s) | {tps:.0f} | {tps / plain_tps:.2f} | "
              f"{c['accepted'] / max(1, c['drafted']):.3f} | {tokens / max(1, c['forwards']):.2f} |")


if __name__ == "__main__":
    main()
