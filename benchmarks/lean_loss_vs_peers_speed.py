"""Step time and peak memory of the lean loss against TRL's fused LM head, Cut Cross-Entropy and Liger Kernel.

    # CPU (no CUDA device): TRL and cut-cross-entropy installed beside the package; Liger needs a GPU: skipped
    OMP_NUM_THREADS=2 python -m benchmarks.lean_loss_vs_peers_speed
    # GPU: every variant, Liger's and CCE's Triton kernels included
    python -m benchmarks.lean_loss_vs_peers_speed --device cuda --dtype bfloat16 --batch 4 --length 2048

One forward + backward of a 2-layer, hidden-256 Llama with a wide untied head (vocabulary 151,936, Qwen2.5's)
on a batch of 2 x 1024 tokens whose first quarter is prompt (labels -100), so that the output head dominates.
Variants:

- ``plain``: transformers' ``model(labels=...)``, its loss over the full logits (the baseline);
- ``lean``: the package's lean loss, ``TokenLossDispatcher.for_model(model).add(PlainLoss())`` (what
  ``CausalLMModule`` runs for plain SFT): target rows only, fused, every gradient finished in forward;
- ``lean-reweight``: the same with a handler that reads ``ctx.token_loss`` and reweights the tokens by it, the
  path ssToken and other selection callbacks take;
- ``trl``: TRL's SFT default loss: ``trl.trainer.utils.add_fused_lm_head`` with the outputs ``SFTTrainer`` asks
  for, called with ``fused_lm_head=True``, the loss ``SFTTrainer.compute_loss`` takes from its ``log_probs``
  (needs ``trl``);
- ``cce``: Apple's Cut Cross-Entropy, ``linear_cross_entropy(hidden, weight, labels, shift=True)`` on the
  backbone's last hidden state; its Triton kernels on CUDA, its ``torch_compile`` implementation elsewhere
  (needs ``cut-cross-entropy``; the compilation falls in the warm-up step);
- ``liger``: Liger Kernel's ``LigerFusedLinearCrossEntropyLoss`` on the same hidden state, CUDA only (Triton).

A variant whose library is missing, or that cannot run on the device, is reported as skipped, with the reason.
Each variant runs in its own process: one warm-up step, then the median of ``--steps`` steps (default 1). Every
variant is measured ``--rounds`` times in turn (default 2), each round's figures divided by that round's ``plain``,
and the table gives the median over rounds, so that a machine whose speed drifts hits every variant alike. Memory
on CPU is the peak resident set size during the timed steps above the resident size before them
(``/proc/self/clear_refs`` resets the peak); on CUDA ``torch.cuda.max_memory_allocated`` above the memory
allocated before them. The loss column shows that every variant computes the same loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

from benchmarks.common import add_device_argument, ratio
from benchmarks.lean_loss_memory import timed_peak

VARIANTS = ("plain", "lean", "lean-reweight", "trl", "cce", "liger")


class ReweightByLoss:
    """A handler that reads the per-token loss and weights each target by ``1 - exp(-loss)`` (hard tokens more)."""

    keep_logits = False

    def reshape_token_loss(self, ctx) -> None:
        ctx.weights = ctx.weights * -torch.expm1(-ctx.token_loss.detach())


def loss_function(variant: str, model, batch: dict, device: str):
    """``(zero-argument function returning the training loss, label)`` of ``variant``; raises ImportError or
    RuntimeError when the variant cannot run here."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    cuda = torch.device(device).type == "cuda"
    if variant == "plain":
        return lambda: model(**batch).loss, "transformers model(labels=...)"
    if variant in ("lean", "lean-reweight"):
        from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher

        TokenLossDispatcher.for_model(model).add(PlainLoss() if variant == "lean" else ReweightByLoss())
        label = "lean loss" if variant == "lean" else "lean loss, handler reads token_loss"
        return lambda: model(**batch).loss, label
    if variant == "trl":
        import trl
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer asks for

        def trl_loss():
            outputs = model(**batch, fused_lm_head=True, use_cache=False)
            return -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)  # SFTTrainer.compute_loss

        return trl_loss, f"TRL {trl.__version__} fused LM head" + ("" if cuda else " (every position on CPU)")
    head = model.get_output_embeddings()
    if variant == "cce":
        from cut_cross_entropy import __version__ as cce_version
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if cuda else "torch_compile"

        def cce_loss():
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
            return linear_cross_entropy(hidden, head.weight, labels, shift=True, impl=impl)

        return cce_loss, f"Cut Cross-Entropy {cce_version} ({impl})"
    if variant == "liger":
        if not cuda:
            raise RuntimeError("Liger's fused linear cross-entropy is a Triton kernel: it needs a GPU")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_loss():
            hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
            return liger(head.weight, hidden.reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1))

        return liger_loss, "Liger fused linear cross-entropy"
    raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")


def run_variant(args) -> dict:
    from benchmarks.caft_memory import build

    model, ids, mask, labels = build(args)
    model.train()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    try:
        compute, label = loss_function(args.variant, model, batch, args.device)
    except (ImportError, RuntimeError) as error:
        return {"variant": args.variant, "skipped": f"{type(error).__name__}: {error}"}
    losses = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        losses.append(loss.item())

    try:
        step()  # warm-up: compilation, the lean loss's one-time check
    except RuntimeError as error:  # a Triton kernel without a GPU, say
        return {"variant": args.variant, "skipped": f"{type(error).__name__}: {str(error)[:200]}"}
    model.zero_grad(set_to_none=True)
    seconds, peak = timed_peak(step, args.device, args.steps)
    return {"variant": args.variant, "label": label, "peak_mib": peak, "step_s": seconds, "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "plain" not in variants:
        parser.error(f"--variants: unknown {unknown} (choose from {', '.join(VARIANTS)}), and plain is required")
    shared = [f"--{k}={getattr(args, k)}" for k in ("device", "dtype", "vocab", "batch", "length", "hidden",
                                                     "layers", "steps")]
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    skipped: dict[str, str] = {}
    for round_ in range(args.rounds):
        plain = None
        for variant in ["plain", *(v for v in variants if v != "plain")]:
            if variant in skipped:
                continue
            command = [sys.executable, "-m", __spec__.name, f"--variant={variant}", *shared]
            stdout = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(stdout.splitlines()[-1])
            if "skipped" in result:
                skipped[variant] = result["skipped"]
                print(f"round {round_ + 1}: {variant} skipped: {result['skipped']}", flush=True)
                continue
            plain = plain or result
            result["memory_x"] = result["peak_mib"] / plain["peak_mib"]
            result["speed_x"] = result["step_s"] / plain["step_s"]
            results[variant].append(result)
            print(f"round {round_ + 1}: {variant:>13} {result['peak_mib']:>7.0f} MiB "
                  f"{ratio(result['peak_mib'], plain['peak_mib'])} {result['step_s']:>6.2f} s "
                  f"{ratio(result['step_s'], plain['step_s'])} loss {result['loss']:.4f}", flush=True)
    print(f"\n{args.device}, {args.dtype}, vocab {args.vocab}, batch {args.batch} x {args.length}, "
          f"hidden {args.hidden}, {args.layers} layers; median of {args.rounds} round(s) of {args.steps} step(s)")
    print("| variant | peak MiB | x plain | step s | x plain | loss |\n| --- | --- | --- | --- | --- | --- |")
    for variant, rows in results.items():
        if not rows:
            continue
        median = {key: statistics.median(row[key] for row in rows)
                  for key in ("peak_mib", "memory_x", "step_s", "speed_x", "loss")}
        print(f"| {rows[0]['label']} | {median['peak_mib']:.0f} | {median['memory_x']:.2f} | {median['step_s']:.2f} | "
              f"{median['speed_x']:.2f} | {median['loss']:.4f} |")
    for variant, reason in skipped.items():
        print(f"| {variant}: skipped ({reason}) | | | | | |")


if __name__ == "__main__":
    main()
