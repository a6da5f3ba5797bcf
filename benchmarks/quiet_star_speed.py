"""Quiet-STaR cost: training step time and memory against a plain LM step on the same batch, and thoughtful
generation speed against plain generation and against the reference's approach (every thought pass re-run
over the whole sequence for each emitted token).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.quiet_star_speed            # CPU, tiny Llama
    .venv/bin/python -m benchmarks.quiet_star_speed --device cuda --hidden 1024 --layers 8 --batch 8 --length 256
    # thoughts at a quarter of the positions
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.quiet_star_speed --think-at 0.25 --new-tokens 0

Memory is reported two ways: bytes of tensors autograd keeps for backward (any device; unique storages)
and, on CUDA, the peak allocated memory of the step. The pass count the algorithm implies, in token-passes
relative to one plain forward: ``1 + n_thoughts * (thought_length + n_ahead_talk + 1)`` (the text pass
runs once, the thought and talk passes on ``n_thoughts`` copies of the batch). With ``--think-at`` (a number of
positions per row, or a share) the thought and talk passes run on the chosen positions alone, and the implied
count scales their part by the share of positions chosen. ``--new-tokens 0`` skips generation.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import add_device_argument, timed
from benchmarks.quiet_star_generate_speed import naive_thoughtful_generate  # the reference's re-run
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule


def saved_bytes(fn) -> int:
    """Run ``fn`` and count the bytes of distinct storages autograd saved for backward."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def timed_pair(first, second, device: str, repeats: int) -> tuple[float, float]:
    """Median times of ``first`` and ``second`` run in alternation, so that a shared machine's drifting speed
    affects both alike (the first round is warm-up)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats + 1):
        for fn, out in zip((first, second), times):
            out.append(timed(fn, device, 0))
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])


def peak(fn, device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return torch.cuda.max_memory_allocated() - base


@torch.no_grad()
def plain_generate(module, ids, new_tokens):
    out = module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--n-thoughts", type=int, default=2)
    parser.add_argument("--thought-length", type=int, default=9)
    parser.add_argument("--talk", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser, "cpu")
    parser.add_argument("--think-at", default="all", help="'all', a number of positions per row, or a share (0.25)")
    args = parser.parse_args()
    think_at = args.think_at if args.think_at == "all" else (float(args.think_at) if "." in args.think_at
                                                              else int(args.think_at))

    config = {"model_type": args.model_type, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
              "intermediate_size": args.hidden * 11 // 4, "num_attention_heads": max(1, args.hidden // 32),
              "num_key_value_heads": max(1, args.hidden // 64)}
    module = QuietSTaRModule(ModelSpec(config=config), n_thoughts=args.n_thoughts, thought_length=args.thought_length,
                             n_ahead_talk=args.talk, think_at=think_at).to(args.device)
    with torch.no_grad():
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.1)
    vocab = module.start_id
    ids = torch.randint(3, vocab, (args.batch, args.length), device=args.device)
    mask = torch.ones_like(ids)

    def plain_step():
        module.zero_grad(set_to_none=True)
        loss = module.model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss

    def quiet_step():
        module.zero_grad(set_to_none=True)
        loss = module.quiet_star(ids, mask).loss
        loss.backward()
        return loss

    module.train()
    t_plain, t_quiet = timed_pair(plain_step, quiet_step, args.device, args.repeats)
    s_plain = saved_bytes(lambda: module.model(input_ids=ids, attention_mask=mask, labels=ids).loss)
    s_quiet = saved_bytes(lambda: module.quiet_star(ids, mask).loss)
    p_plain, p_quiet = peak(plain_step, args.device), peak(quiet_step, args.device)
    if think_at == "all":
        share = 1.0
    else:
        share = min(think_at, args.length - 1) / args.length if isinstance(think_at, int) else think_at
    implied = 1 + args.n_thoughts * (args.thought_length + args.talk + 1) * share
    print(f"# device={args.device} {args.model_type} hidden={args.hidden} layers={args.layers} batch={args.batch} "
          f"length={args.length} n_thoughts={args.n_thoughts} thought_length={args.thought_length} talk={args.talk} "
          f"think_at={think_at}")
    print("| training step | plain LM | Quiet-STaR | ratio | implied by pass count |")
    print("|---|---|---|---|---|")
    print(f"| time (s) | {t_plain:.4f} | {t_quiet:.4f} | {t_quiet / t_plain:.1f}x | {implied:.1f}x token-passes |")
    print(f"| saved for backward (MiB) | {s_plain / 2**20:.1f} | {s_quiet / 2**20:.1f} | {s_quiet / s_plain:.1f}x | |")
    if args.device == "cuda":
        print(f"| peak CUDA memory (MiB) | {p_plain / 2**20:.1f} | {p_quiet / 2**20:.1f} | "
              f"{p_quiet / p_plain:.1f}x | |")

    if args.new_tokens == 0:
        return
    module.eval()
    prompt = ids[: max(1, args.batch // 2), : args.prompt]
    rows, n = prompt.shape[0], args.new_tokens
    fast = module.generate(prompt, max_new_tokens=n, eos_token_id=None).sequences[:, args.prompt:]
    slow = naive_thoughtful_generate(module, prompt, n)
    same = torch.equal(fast, slow)
    t_gen_plain = timed(lambda: plain_generate(module, prompt, n), args.device, args.repeats)
    t_gen_fast = timed(lambda: module.generate(prompt, max_new_tokens=n, eos_token_id=None), args.device, args.repeats)
    t_gen_slow = timed(lambda: naive_thoughtful_generate(module, prompt, n), args.device, max(1, args.repeats // 2))
    tps = lambda t: rows * n / t  # noqa: E731
    print(f"\n# generation: batch={rows} prompt={args.prompt} new_tokens={n}; KV-cache thoughtful == naive "
          f"re-run (greedy): {same}")
    print("| generation | tokens/s | vs plain | vs naive re-run |")
    print("|---|---|---|---|")
    print(f"| plain greedy (HF generate) | {tps(t_gen_plain):.1f} | 1.00x | |")
    print(f"| thoughtful, cache allocated once | {tps(t_gen_fast):.1f} | {t_gen_plain / t_gen_fast:.3f}x | "
          f"{t_gen_slow / t_gen_fast:.1f}x faster |")
    print(f"| thoughtful, naive re-run (reference) | {tps(t_gen_slow):.1f} | {t_gen_plain / t_gen_slow:.3f}x | 1.0x |")


if __name__ == "__main__":
    main()
