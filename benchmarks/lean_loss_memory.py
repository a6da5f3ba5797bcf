"""Peak memory and step time of one training step: plain transformers against the lean per-token loss.

    OMP_NUM_THREADS=2 python -m benchmarks.lean_loss_memory                      # CPU, both vocabularies
    python -m benchmarks.lean_loss_memory --device cuda --dtype bfloat16         # GPU

One forward + backward of a 2-layer, hidden-256 Llama (untied embeddings) on a batch of 4 x 1024 tokens
whose first quarter is prompt, at vocabularies 32,000 and 151,936 (Qwen2.5's). Variants:

- ``plain``: ``model(labels=...)``, transformers' own loss over the full logits (the baseline);
- ``contract``: the per-token loss contract with one handler that changes nothing (``PlainLoss``), which is
  also what ``CausalLMModule`` runs for plain SFT;
- ``selection`` / ``caft``: ``TokenSelection`` (ssToken, history = a frozen copy) and
  ``ConceptAwareFineTuning`` (4 layer heads) attached through the dispatcher;
- ``*-full``: the same with ``keep_logits=True``, the full-logits path (the project before the lean loss).

Each variant runs in its own process: one warm-up step, then ``--steps`` timed steps (median). Memory on CPU is
the peak resident set size during the steps above the resident size before them (``/proc/self/clear_refs``
resets the peak), so weights, gradients of earlier steps' and the batch are outside it; on CUDA it is
``torch.cuda.max_memory_allocated`` above the memory allocated before the step. Ratios are against ``plain``
at the same vocabulary, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from benchmarks.common import add_device_argument, synchronize, timed

VARIANTS = ("plain", "contract", "selection", "caft", "selection-full", "caft-full")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def timed_peak(step, device: str, steps: int) -> tuple[float, float]:
    """Median seconds of ``steps`` calls of ``step`` and the peak MiB they reach above what is held before them:
    ``torch.cuda.max_memory_allocated`` on CUDA, else the peak resident set size (``/proc/self/clear_refs``)."""
    cuda = torch.device(device).type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak resident set size
        before = rss_kib("VmRSS")
    seconds = timed(step, device, repeats=steps, warmup=0)
    peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20 if cuda else (rss_kib("VmHWM") - before) / 1024
    return seconds, peak


def build(args):
    """The benchmark's model (sdpa, untied) and batch, as ``caft_memory.py`` builds them."""
    from benchmarks.caft_memory import build as build_llama

    model, ids, mask, labels = build_llama(args)
    return model.train(), {"input_ids": ids, "attention_mask": mask, "labels": labels}


def attach(variant: str, model):
    import warnings

    import lightning.pytorch as pl

    from lightning_tokens import ConceptAwareFineTuning, TokenSelection
    from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher

    keep_logits = variant.endswith("-full")
    name = variant.removesuffix("-full")
    if name == "contract":
        TokenLossDispatcher.for_model(model).add(PlainLoss())
    elif name == "selection":
        TokenSelection(warmup=0, keep_logits=keep_logits).attach(model)
    elif name == "caft":
        holder = pl.LightningModule()
        holder.net = model
        caft = ConceptAwareFineTuning(num_heads=4, keep_logits=keep_logits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fresh heads: untrained, which costs the same
            caft.setup(None, holder, "fit")
        caft.total_steps = 100
        return holder
    return model


def run_variant(args) -> dict:
    model, batch = build(args)
    owner = attach(args.variant, model)
    losses = []

    def step() -> None:
        owner.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())

    step()  # warm-up (and the lean loss's one-time check)
    owner.zero_grad(set_to_none=True)
    seconds, peak = timed_peak(step, args.device, args.steps)
    return {"variant": args.variant, "vocab": args.vocab, "peak_mib": peak, "step_s": seconds, "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_argument(parser, "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocabs", default="32000,151936")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    shared = [f"--{k}={getattr(args, k)}" for k in ("device", "dtype", "batch", "length", "hidden", "layers", "steps")]
    print(f"{'vocab':>7} {'variant':>15} {'peak MiB':>9} {'x plain':>8} {'step s':>7} {'x plain':>8} {'loss':>8}")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        plain = None
        for variant in args.variants.split(","):
            command = [sys.executable, "-m", __spec__.name, f"--variant={variant}", f"--vocab={vocab}", *shared]
            stdout = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(stdout.splitlines()[-1])
            plain = plain or (result if variant == "plain" else None)
            memory = result["peak_mib"] / plain["peak_mib"] if plain else float("nan")
            speed = result["step_s"] / plain["step_s"] if plain else float("nan")
            print(f"{vocab:>7} {variant:>15} {result['peak_mib']:>9.0f} {memory:>8.2f} {result['step_s']:>7.2f} "
                  f"{speed:>8.2f} {result['loss']:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
