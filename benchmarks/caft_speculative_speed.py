"""Tokens per second of self-speculative decoding with stage-1 heads vs plain greedy ``generate``.

    # a 4-layer, 128-wide base and its layer heads, batch 1 (the defaults)
    OMP_NUM_THREADS=1 python -m benchmarks.caft_speculative_speed --prepare

    # a 12-layer, 256-wide base; layer and resblock heads trained in stage 1 on the same self-distilled answers
    OMP_NUM_THREADS=1 python -m benchmarks.caft_speculative_speed --out runs/heads-speculative-12x256-s150 --prepare \\
        --layers 12 --hidden 256 --base-steps 400 --distill 4096 --heads-steps 150 --architecture layer resblock
    OMP_NUM_THREADS=1 python -m benchmarks.caft_speculative_speed --out runs/heads-speculative-12x256-s150 \\
        --architecture layer resblock --batch 1 8 --prompts 32

``--prepare`` builds what ``--out`` lacks (a base trained with plain SFT on the
``easy`` preset, its greedy answers to fresh prompts, 4 heads per architecture trained on those with the base
frozen); a cached base of another ``--layers``/``--hidden`` is refused. Without it, base and heads must exist.

Both decoders run greedy on the same held-out prompts of the preset the heads were trained on, in batches of
``--batch`` left-padded prompts (plain ``generate`` gets the same batch and attention mask). The decoders
alternate batch by batch, so machine load hits them alike. Every output row is checked against the plain
one, both cut after their first eos. Per batch size, heads and drafts: tokens per second (real tokens of all
rows), the ratio to plain greedy in the same run, the heads' acceptance rate, tokens per forward (per row:
generated tokens over the forwards the row took part in) and the number of batched forwards relative to plain
``generate``'s. Prints a markdown table and writes it with the settings to ``--out/speculative.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.common import add_device_argument
from lightning_tokens.caft import MultiTokenHeads, MultiTokenHeadsModule, generate_with_heads, self_distill
from lightning_tokens.data.encode import prompt_ids
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.sft import CausalLMModule


def trainer(steps: int, callbacks=(), val: bool = False) -> pl.Trainer:
    return pl.Trainer(accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1.0 if val else 0, callbacks=list(callbacks), gradient_clip_val=1.0)


def base_config(layers: int = 4, hidden: int = 128) -> dict:
    """Config of a tiny Llama base; the defaults give exactly ``TINY_DEFAULTS["llama"]``."""
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4, "num_attention_heads": hidden // 32,
            "num_key_value_heads": max(1, hidden // 64)}


def base_model(out: str, steps: int, layers: int = 4, hidden: int = 128) -> Path:
    """The base under ``out/base``: trained with plain SFT on ``easy`` for ``steps`` steps, or reused if there."""
    path = Path(out) / "base"
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        found = (config["num_hidden_layers"], config["hidden_size"])
        if found != (layers, hidden):
            raise SystemExit(f"{path} holds a base of {found[0]} layers x {found[1]} wide, not the requested "
                             f"{layers} x {hidden}: pick another --out")
        return path
    pl.seed_everything(1000)
    module = CausalLMModule(ModelSpec(config=base_config(layers, hidden), seed=1000),
                            OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup=0.05), max_new_tokens=0)
    data = SFTDataModule(task=ReasoningTask.preset("easy", num_train=steps * 32, num_val=8, seed=1000),
                         max_length=256, batch_size=32)
    trainer(steps).fit(module, datamodule=data)
    return module.export(path)


def heads_dir(out: str, architecture: str = "layer") -> Path:
    """Where stage-1 heads of ``architecture`` live: ``heads/`` for layer heads, ``heads-<architecture>/`` else."""
    return Path(out) / ("heads" if architecture == "layer" else f"heads-{architecture}")


def stage1_file(out: str, architecture: str = "layer") -> Path:
    """Held-out head accuracy of stage 1: ``stage1.json`` for layer heads, ``stage1-<architecture>.json`` else."""
    return Path(out) / ("stage1.json" if architecture == "layer" else f"stage1-{architecture}.json")


def stage1_heads(out: str, base: Path, distill: int, steps: int, architecture: str = "layer") -> Path:
    """4 heads of ``architecture`` trained ``steps`` steps on ``distill`` self-distilled answers of the base
    (``out/distilled.jsonl``, shared by all architectures), or reused if there; see :func:`stage1_file`."""
    path = heads_dir(out, architecture)
    if (path / "heads.safetensors").is_file():
        return path
    spec = ModelSpec(name_or_path=str(base))
    module = MultiTokenHeadsModule(spec, num_heads=4, architecture=architecture,
                                   optimizer=OptimizerConfig(lr=1e-3, warmup=0.05), heads_path=str(path))
    records = ReasoningTask.preset("easy", num_train=distill, num_val=8, seed=2000).records("train")
    distilled = Path(out) / "distilled.jsonl"
    if not distilled.is_file():
        module.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self_distill(module.model, module.tokenizer, [r["prompt"] for r in records], distilled,
                     max_new_tokens=96, batch_size=128)
    pl.seed_everything(2000)
    data = SFTDataModule(train_file=str(distilled), val_fraction=0.05, max_length=256, batch_size=32)
    run = trainer(steps, val=True)
    run.fit(module, datamodule=data)
    run.validate(module, datamodule=data, verbose=False)
    accuracy = {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("val/head") and k.endswith("_acc")}
    stage1_file(out, architecture).write_text(json.dumps(accuracy, indent=2))
    return path


def left_padded(rows: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the prompts ``rows``, padded on the left to the longest."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


def until_eos(row: list[int], eos: int) -> list[int]:
    """The generated tokens of one row up to and with its first eos (what follows is padding)."""
    return row[: row.index(eos) + 1] if eos in row else row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/heads-experiment")
    parser.add_argument("--architecture", nargs="+", default=["layer"], choices=["layer", "resblock"],
                        help="heads to benchmark (layer: --out/heads, resblock: --out/heads-resblock)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="prompts per batch")
    parser.add_argument("--preset", default="easy")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (rounded down to whole batches)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-draft", type=int, nargs="+", default=None, help="drafts per round (default: 1..K)")
    add_device_argument(parser)
    preparation = parser.add_argument_group("preparation (--prepare; a cached base of other sizes is refused)")
    preparation.add_argument("--prepare", action="store_true", help="train the base and heads --out lacks")
    preparation.add_argument("--layers", type=int, default=4, help="decoder layers of the base")
    preparation.add_argument("--hidden", type=int, default=128, help="width of the base (a multiple of 64)")
    preparation.add_argument("--base-steps", type=int, default=400)
    preparation.add_argument("--distill", type=int, default=4096, help="self-distilled stage-1 samples")
    preparation.add_argument("--heads-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.prepare:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        base = base_model(args.out, args.base_steps, args.layers, args.hidden)
        for architecture in args.architecture:
            started = time.perf_counter()
            stage1_heads(args.out, base, args.distill, args.heads_steps, architecture)
            print(f"{architecture} heads ready in {time.perf_counter() - started:.0f} s", flush=True)

    model, tokenizer = load_causal_lm(ModelSpec(name_or_path=f"{args.out}/base"))
    model.to(args.device).eval()
    heads = {a: MultiTokenHeads.load(heads_dir(args.out, a), model).to(args.device).eval() for a in args.architecture}
    num_heads = min(h.num_heads for h in heads.values())
    drafts = args.num_draft or list(range(1, num_heads + 1))
    records = ReasoningTask.preset(args.preset, num_train=1, num_val=args.prompts, seed=3000).records("val")
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    settings = [(a, n) for a in args.architecture for n in drafts]

    def plain(ids, mask):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos)
        return [until_eos(row, eos) for row in out[:, ids.shape[1]:].tolist()]

    def drafted(ids, mask, architecture, num_draft):
        out, stats = generate_with_heads(model, heads[architecture], ids, attention_mask=mask,
                                         max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                         num_draft=num_draft, pad_token_id=pad)
        prompt_width = int(mask.bool().any(0).sum())  # all-padding columns are dropped
        return [until_eos(row, eos) for row in out[:, prompt_width:].tolist()], stats

    table = []
    for size in args.batch:
        batches = [left_padded(prompts[i:i + size], pad, args.device)
                   for i in range(0, len(prompts) - size + 1, size)]
        plain(*batches[0]), [drafted(*batches[0], *s) for s in settings]  # warm-up
        seconds = {key: 0.0 for key in ["plain", *settings]}
        counts = {s: dict(drafted=0, accepted=0, forwards=0, row_tokens=0, row_forwards=0, same=0) for s in settings}
        tokens = plain_forwards = 0
        # Not common.timed: the decoders alternate batch by batch, so machine load hits them alike, and their
        # times add up over the batches (each call ends in .tolist(), which waits for the device).
        for ids, mask in batches:
            start = time.perf_counter()
            reference = plain(ids, mask)
            seconds["plain"] += time.perf_counter() - start
            tokens += sum(len(row) for row in reference)
            plain_forwards += max(len(row) for row in reference)  # generate runs until its longest row ends
            for s in settings:
                start = time.perf_counter()
                rows, stats = drafted(ids, mask, *s)
                seconds[s] += time.perf_counter() - start
                seen = dict(drafted=stats.drafted, accepted=stats.accepted, forwards=stats.forwards,
                            row_tokens=sum(stats.row_new_tokens), row_forwards=sum(stats.row_forwards),
                            same=sum(a == b for a, b in zip(rows, reference)))
                counts[s] = {key: counts[s][key] + value for key, value in seen.items()}
        rows_run = len(batches) * size
        same = sum(c["same"] for c in counts.values())
        print(f"batch={size} device={args.device} threads={torch.get_num_threads()} rows={rows_run} tokens={tokens} "
              f"identical={same}/{rows_run * len(settings)}", flush=True)
        plain_tps = tokens / seconds["plain"]
        table.append(dict(batch=size, heads="-", drafts=0, tokens_per_s=plain_tps, ratio=1.0, acceptance=None,
                          tokens_per_forward=1.0, forwards_vs_plain=1.0, identical=None))
        for s in settings:
            c = counts[s]
            table.append(dict(batch=size, heads=s[0], drafts=s[1], tokens_per_s=tokens / seconds[s],
                              ratio=seconds["plain"] / seconds[s], acceptance=c["accepted"] / max(1, c["drafted"]),
                              tokens_per_forward=c["row_tokens"] / max(1, c["row_forwards"]),
                              forwards_vs_plain=c["forwards"] / plain_forwards, identical=f"{c['same']}/{rows_run}"))
    print("| batch | decoder | tokens/s | x plain | acceptance | tokens/forward | forwards vs plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        name = "plain greedy `generate`" if r["heads"] == "-" else f"{r['heads']} heads, {r['drafts']} draft(s)"
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        print(f"| {r['batch']} | {name} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f} | {acceptance} | "
              f"{r['tokens_per_forward']:.2f} | {r['forwards_vs_plain']:.2f} |")
    info = dict(args=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), table=table)
    (Path(args.out) / "speculative.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
