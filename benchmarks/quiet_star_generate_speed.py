"""Thoughtful generation speed: the slot-cache decoder (``thoughtful_generate``) against plain greedy generation
and against the reference's approach, every thought pass re-run over the whole sequence for each new token.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.quiet_star_generate_speed          # CPU, tiny Llama, a few minutes
    python -m benchmarks.quiet_star_generate_speed --device cuda --hidden 1024 --layers 8 --batch 8 --compile
    python -m benchmarks.quiet_star_generate_speed --device cuda --compile 256   # compiled at prompt length 256 only

For each prompt length: plain greedy ``generate`` and thoughtful generation of ``--new-tokens`` tokens (median
of ``--repeats`` runs after a warm-up; with ``--compile`` also with compiled steps, the compiling call timed apart),
then the naive re-run for ``--naive-tokens`` tokens (a first run, whose greedy tokens must equal the first ones
of the thoughtful decoder, then the median of ``--repeats // 2`` runs, at least one). Rates are new tokens per
second over the batch, so runs of different lengths compare.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import add_device_argument, synchronize, timed
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule, parallel_thoughts
from lightning_tokens.quiet_star.parallel import forbid


@torch.no_grad()
def plain_generate(module: QuietSTaRModule, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def naive_thoughtful_generate(module: QuietSTaRModule, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference's way: for every new token, all thought passes over the whole sequence again."""
    lm, te, head = module.lm, module.thought_embeddings, module.lm.get_output_embeddings()
    for _ in range(new_tokens):
        passes = parallel_thoughts(lm, ids, torch.ones_like(ids), te.start, te.end, module.forbidden_ids,
                                   n_thoughts=1, thought_length=module.thought_length, n_ahead_talk=1,
                                   temperature=0.0)
        mixed, _ = module.mixing_head(passes.base_hidden[:, -1], passes.talk_hidden[0][:, -1])
        token = forbid(head(mixed), module.forbidden_ids).argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[:, -new_tokens:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--thought-length", type=int, default=9)
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 256, 1024], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens of plain and thoughtful generation")
    parser.add_argument("--naive-tokens", type=int, default=2, help="tokens of the (slow) naive re-run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", type=int, nargs="*", metavar="PROMPT",
                        help="also time thoughtful_generate(compile=True): at every prompt length, or at those given")
    add_device_argument(parser, "cpu")
    args = parser.parse_args()
    if args.naive_tokens > args.new_tokens:
        parser.error("--naive-tokens must not exceed --new-tokens (its tokens are checked against theirs)")

    config = {"model_type": args.model_type, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
              "intermediate_size": args.hidden * 11 // 4, "num_attention_heads": max(1, args.hidden // 32),
              "num_key_value_heads": max(1, args.hidden // 64),
              "max_position_embeddings": max(args.prompts) + args.new_tokens + args.thought_length + 2}
    module = QuietSTaRModule(ModelSpec(config=config), thought_length=args.thought_length,
                             n_ahead_talk=1).to(args.device).eval()
    with torch.no_grad():
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.1)
    n, m, rows, device = args.new_tokens, args.naive_tokens, args.batch, args.device
    print(f"# device={device} {args.model_type} hidden={args.hidden} layers={args.layers} batch={rows} "
          f"thought_length={args.thought_length} new_tokens={n} (naive re-run: {m}) repeats={args.repeats} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print("| prompt | generation | tokens/s | vs plain | vs naive re-run | greedy == naive |")
    print("|---|---|---|---|---|---|", flush=True)
    for length in args.prompts:
        torch.manual_seed(length)
        ids = torch.randint(3, module.start_id, (rows, length), device=device)
        fast = module.generate(ids, max_new_tokens=n, eos_token_id=None).sequences[:, length:]
        rates = {"plain greedy (HF generate)": rows * n / timed(lambda: plain_generate(module, ids, n), device,
                                                                 args.repeats)}
        rates["thoughtful, slot cache"] = rows * n / timed(
            lambda: module.generate(ids, max_new_tokens=n, eos_token_id=None), device, args.repeats)
        same = {"thoughtful, slot cache": None}
        if args.compile is not None and (not args.compile or length in args.compile):
            synchronize(device)
            start = time.perf_counter()
            compiled = module.generate(ids, max_new_tokens=n, eos_token_id=None, compile=True).sequences[:, length:]
            synchronize(device)
            name = f"thoughtful, slot cache, compiled (first call {time.perf_counter() - start:.1f} s)"
            rates[name] = rows * n / timed(lambda: module.generate(ids, max_new_tokens=n, eos_token_id=None,
                                                                   compile=True), device, args.repeats)
            same[name] = compiled
        slow = naive_thoughtful_generate(module, ids, m)  # also its warm-up
        naive = "naive re-run (reference approach)"
        rates[naive] = rows * m / timed(lambda: naive_thoughtful_generate(module, ids, m), device,
                                        max(1, args.repeats // 2), warmup=0)
        same = {name: torch.equal((fast if tokens is None else tokens)[:, :m], slow) for name, tokens in same.items()}
        plain = rates["plain greedy (HF generate)"]
        for name, rate in rates.items():
            check = {True: "yes", False: "**no**"}.get(same.get(name), "")
            print(f"| {length} | {name} | {rate:.1f} | {rate / plain:.3f}x | {rate / rates[naive]:.1f}x | {check} |",
                  flush=True)


if __name__ == "__main__":
    main()
