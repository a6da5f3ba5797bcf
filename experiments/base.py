"""One pretrained base for the experiments: a tiny Llama trained on the embedded task, built once and cached.

The base is a Llama (default 6 layers, hidden 192, ~2.6M weights, embedded tokenizer) trained from scratch
with plain next-token loss on fresh problems of all three difficulty presets (``easy``, ``medium``,
``hard``, equal numbers of each) in both solution styles (``mixed``: concise or verbose per problem). It
is meant to know the format and solve easy problems often, medium ones sometimes and hard ones rarely,
so that one epoch of fine-tuning (ssToken, CAFT, Quiet-STaR, budget guidance) has room to show effects.

    # the full base (projected 25-28 minutes on 2 free CPU cores), then its held-out exact match per difficulty
    OMP_NUM_THREADS=2 .venv/bin/python -m experiments.base
    # a quick end-to-end check (a different key, so a different cache entry)
    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.base --steps 30 --eval 16 --threads 1

From an experiment or a benchmark (run from the repository root)::

    from experiments.base import BaseSettings, build_base
    path = build_base(BaseSettings())                       # runs/pretrained-base/<key>/model
    spec = ModelSpec(name_or_path=str(path))

Training data is the SFT format of the experiments (``bos + prompt`` as context, ``completion + eos`` as
targets, :class:`SFTDataModule`, packed rows): the loss is plain next-token loss on the responses. The
prompt's operands are random digits nobody can predict, and the plain-text corpus
(:class:`PlainTextDataModule`) has no eos and a newline between prompt and ``<think>``, so a base trained
there would neither stop nor see the prompts the experiments give it.

Seeds: the base trains on the ``train`` split of ``ReasoningTask`` seeds 100 (easy), 101 (medium) and
102 (hard), and is evaluated on the ``val`` split of the same seeds (the ``--eval-seed`` option moves
that). Experiments should draw their problems, held-out sets above all, from other seeds. Training
problems whose prompt is among the first 128 ``val`` problems of their seed are dropped, so an
evaluation of up to 128 problems per difficulty at the default ``--eval-seed`` is held out (not more: easy
has only 200 distinct one-digit + one-digit problems, and a larger held-out set would take nearly all of
them out of training). ``easy`` has only 20,000 distinct problems, so an experiment's easy held-out set will
share problems with the base's training data anyway.

Sizing (2026-12-02, 2 shared CPU cores, another benchmark running): the 8 x 256 Llama trains at 890-945
real tokens/s on one thread (packed rows of 768); 2 threads are projected at 1,250-1,400 tokens/s. At
equal tokens, 2 rows per step learned faster than 4 (loss 1.60 vs 2.22 after 184k tokens), so the default
is 2 rows (~1,530 tokens) per step. The 6 x 192 Llama trains at 1,600-1,850 tokens/s on one thread and
learned about as fast per step early on, so at the same wall time it sees twice the tokens, and every
experiment that fine-tunes it runs twice as fast: it is the default. Evaluation (128 problems per difficulty,
batch 64) is dominated by the hard problems' ~700-token answers: about 3-4 minutes on 2 threads.

The cache lives under ``runs/pretrained-base/<key>/``, where ``<key>`` is a readable slug plus a short hash
of every training setting (:class:`BaseSettings`). It holds ``model/`` (``save_pretrained`` weights and
tokenizer) and ``base.json`` (settings, training time and throughput, evaluations). A build writes into
``<key>.partial/`` and renames it when done, so an interrupted build leaves no half-written base; the next
call starts that build again. Evaluations are kept per evaluation setting in ``base.json``; asking for a
new one on a cached base evaluates it and adds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tokens.data.encode import pad, prompt_ids
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.packing import real_token_count
from lightning_tokens.data.reasoning_task import PRESETS, ReasoningTask, check_answer, extract_answer
from lightning_tokens.files import atomic_path
from lightning_tokens.modeling import ModelSpec, load_frozen_causal_lm
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.sft import CausalLMModule

ROOT = Path(__file__).resolve().parent.parent / "runs" / "pretrained-base"  # of the repository, from any cwd
DIFFICULTIES = tuple(PRESETS)  # easy, medium, hard
#: Mean tokens of one easy + one medium + one hard record in mixed style (measured on 500 of each), used
#: to draw just enough problems for one pass over the training steps.
TOKENS_PER_TRIPLE = 556
#: Validation problems per difficulty kept out of the training data (the first ones of each seed's stream);
#: the default evaluation size.
HELD_OUT = 128


@dataclass(frozen=True)
class BaseSettings:
    """Everything that changes the trained base (all of it goes into the cache key).

    Attributes:
        layers: Decoder layers. Default ``6``.
        hidden: Hidden size; attention heads are 32 wide (half as many key/value heads), the MLP 2.75x.
            Default ``192``.
        steps: Optimizer steps. Default ``2200`` (~3.4M training tokens: about 25 minutes on 2 cores).
        batch_size: Packed rows per step (~1,530 real tokens per step at 2 rows). Default ``2``.
        max_length: Tokens per packed row; the longest record (hard, verbose) has ~720. Default ``768``.
        lr: Peak learning rate of AdamW. Default ``2e-3``.
        warmup: Warm-up, a fraction of the steps. Default ``0.05``.
        min_lr_ratio: Final learning rate of the cosine decay, a fraction of ``lr``. Default ``0.1``.
        weight_decay: Decoupled weight decay of the matrices. Default ``0.01``.
        problems: Training problems per difficulty. Default ``0``: just enough for one pass over ``steps``.
        style: Solution style of the training problems. Default ``"mixed"``.
        seed: Task seed of the first difficulty (the others follow: 100, 101, 102), also the seed of the
            model's initialisation and of the data order. Default ``100``.
        threads: Torch threads of the training. The order of float sums depends on it, so the weights do: a
            base built on 1 thread differs from one built on 2 (the ssToken evidence ran on 1, the other parts on
            2). The key names it only when it is not 2, the count every base had before it was a setting.
            Default ``2``.
    """

    layers: int = 6
    hidden: int = 192
    steps: int = 2200
    batch_size: int = 2
    max_length: int = 768
    lr: float = 2e-3
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    problems: int = 0
    style: str = "mixed"
    seed: int = 100
    threads: int = 2

    def resolved(self) -> "BaseSettings":
        """These settings with ``problems`` filled in when it is ``0`` (so the key names the real data)."""
        if self.problems:
            return self
        tokens = self.steps * self.batch_size * self.max_length
        return dataclasses.replace(self, problems=math.ceil(1.05 * tokens / TOKENS_PER_TRIPLE))

    def key(self) -> str:
        """A readable slug and a hash of every setting, e.g. ``l6-h192-s2200-3f2a9c1e`` (``-t1`` after the steps on
        1 thread)."""
        settings = self.resolved()
        identity = {**dataclasses.asdict(settings), "held_out": HELD_OUT}
        slug = f"l{settings.layers}-h{settings.hidden}-s{settings.steps}"
        if identity.pop("threads") != BaseSettings.threads:  # bases built before it was a setting keep their key
            identity["threads"] = settings.threads
            slug += f"-t{settings.threads}"
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return f"{slug}-{digest[:8]}"


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation: greedy, batched, left-padded generation on fresh problems of each difficulty.

    Attributes:
        problems: Problems per difficulty. Default ``128``.
        seed: Task seed of the first difficulty (``val`` split; the others follow). Default ``100``.
        max_new_tokens: Generation limit; a verbose hard answer takes up to ~700 tokens. Default ``768``.
        batch_size: Prompts per ``generate`` call. Default ``64``.
    """

    problems: int = HELD_OUT
    seed: int = 100
    max_new_tokens: int = 768
    batch_size: int = 64

    def key(self) -> str:
        return f"n{self.problems}-seed{self.seed}-new{self.max_new_tokens}"


# ---------------------------------------------------------------- data


def task(difficulty: str, seed: int, style: str, num_train: int = 0, num_val: int = 0) -> ReasoningTask:
    """The task of one difficulty; difficulty ``i`` of :data:`DIFFICULTIES` uses seed ``seed + i``."""
    return ReasoningTask.preset(difficulty, num_train=num_train, num_val=num_val, style=style,
                                seed=seed + DIFFICULTIES.index(difficulty))


def eval_records(seed: int, problems: int) -> dict[str, list[dict[str, str]]]:
    """The held-out records of each difficulty: the first ``problems`` of the ``val`` split (a stream of its
    own, so a longer list starts with the shorter one)."""
    return {name: task(name, seed, "mixed", num_val=problems).records("val") for name in DIFFICULTIES}


def write_training_records(settings: BaseSettings, path: Path) -> int:
    """Write the mixed training records to ``path`` (jsonl); returns their count.

    Problems whose prompt is among the first :data:`HELD_OUT` validation problems of the same seeds are
    left out. The difficulties are interleaved; the data module shuffles them anyway.
    """
    held_out = {record["prompt"] for records in eval_records(settings.seed, HELD_OUT).values()
                for record in records}
    by_difficulty = [task(name, settings.seed, settings.style, num_train=settings.problems).records("train")
                     for name in DIFFICULTIES]
    count = 0
    with path.open("w") as out:
        for group in zip(*by_difficulty):
            for record in group:
                if record["prompt"] not in held_out:
                    out.write(json.dumps(record) + "\n")
                    count += 1
    return count


# ---------------------------------------------------------------- training


def llama_config(layers: int, hidden: int) -> dict[str, Any]:
    """A Llama config dict for :class:`ModelSpec`: 32-wide attention heads, GQA 2:1, MLP 2.75x hidden."""
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4, "num_attention_heads": hidden // 32,
            "num_key_value_heads": max(1, hidden // 64), "max_position_embeddings": 1024}


class Throughput(pl.Callback):
    """Counts real (non-padding) training tokens and prints loss and tokens/s every ``every`` steps."""

    def __init__(self, every: int = 50) -> None:
        self.every, self.tokens, self.started = every, 0, 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.tokens += int(real_token_count(batch))
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            elapsed = time.perf_counter() - self.started
            print(f"step {step}/{trainer.max_steps}  loss {float(outputs['loss']):.4f}  "
                  f"{self.tokens:,} tokens  {self.tokens / elapsed:,.0f} tokens/s  {elapsed / 60:.1f} min", flush=True)


def train(settings: BaseSettings, records: Path, out: Path) -> dict[str, Any]:
    """Train the base on the records of ``records`` on ``settings.threads`` torch threads and export it to
    ``out``; returns timing figures."""
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(settings, records, out)
    finally:
        torch.set_num_threads(before)


def _train(settings: BaseSettings, records: Path, out: Path) -> dict[str, Any]:
    pl.seed_everything(settings.seed, verbose=False)
    module = CausalLMModule(
        ModelSpec(config=llama_config(settings.layers, settings.hidden), seed=settings.seed),
        OptimizerConfig(lr=settings.lr, weight_decay=settings.weight_decay, warmup=settings.warmup,
                        schedule="cosine", min_lr_ratio=settings.min_lr_ratio),
        max_new_tokens=0)
    data = SFTDataModule(train_file=str(records), val_fraction=0.0, max_length=settings.max_length,
                         batch_size=settings.batch_size, packing=True, seed=settings.seed)
    meter = Throughput()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=settings.steps, precision="32-true",
                         gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[meter])
    trainer.fit(module, datamodule=data)
    if trainer.global_step < settings.steps:  # stopped early (Lightning turns SIGTERM into a quiet stop)
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {settings.steps}")
    seconds = time.perf_counter() - meter.started
    module.export(out)
    rows = len(data.packed_rows)
    return {"weights": sum(p.numel() for p in module.model.parameters()), "train_seconds": round(seconds, 1),
            "train_tokens": meter.tokens, "tokens_per_second": round(meter.tokens / seconds, 1),
            "epochs": round(settings.steps * settings.batch_size / rows, 3), "packed_rows": rows,
            "fill": round(data.packed_rows.fill, 4), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model_dir: Path, evaluation: EvalSettings) -> dict[str, Any]:
    """Held-out exact match per difficulty of the model in ``model_dir`` (greedy, batched, left-padded).

    Also reports the share of answers in the task's format (an integer after ``</think>``) and the mean
    generated length in tokens.
    """
    model, tokenizer = load_frozen_causal_lm(ModelSpec(name_or_path=str(model_dir)))
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, records in eval_records(evaluation.seed, evaluation.problems).items():
        correct = formatted = generated = 0
        for start in range(0, len(records), evaluation.batch_size):
            batch = records[start:start + evaluation.batch_size]
            ids = [prompt_ids(tokenizer, record["prompt"]) for record in batch]
            input_ids = pad(ids, tokenizer.pad_token_id, side="left")
            attention_mask = pad([[1] * len(i) for i in ids], 0, side="left")
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                    max_new_tokens=evaluation.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            for row, record in zip(output[:, input_ids.shape[1]:].tolist(), batch):
                row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
                text = tokenizer.decode(row, skip_special_tokens=True)
                correct += check_answer(text, record["answer"])
                formatted += extract_answer(text) is not None
                generated += len(row)
        results[name] = {"exact_match": correct / len(records), "correct": correct, "problems": len(records),
                         "formatted": formatted / len(records), "mean_new_tokens": generated / len(records)}
    return {"settings": dataclasses.asdict(evaluation), "per_difficulty": results,
            "seconds": round(time.perf_counter() - started, 1)}


def table(evaluation: dict[str, Any]) -> str:
    """A markdown table of an evaluation: exact match, answers in format and mean length per difficulty."""
    lines = ["| difficulty | exact match | correct | in format | mean new tokens |", "|---|---|---|---|---|"]
    for name, row in evaluation["per_difficulty"].items():
        lines.append(f"| {name} | {row['exact_match']:.1%} | {row['correct']}/{row['problems']} | "
                     f"{row['formatted']:.1%} | {row['mean_new_tokens']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the cache


def build_base(settings: BaseSettings = BaseSettings(), evaluation: EvalSettings = EvalSettings(),
               root: Path = ROOT) -> Path:
    """The directory of the exported base of ``settings`` (``root/<key>/model``), built only if missing.

    A build trains in ``root/<key>.partial/`` (removed first if an interrupted build left it), evaluates,
    writes ``base.json`` and then renames the folder to ``root/<key>``. A cached base without an evaluation
    of ``evaluation``'s settings is evaluated and its ``base.json`` updated (through a temporary file).
    """
    settings = settings.resolved()
    final = root / settings.key()
    if not (final / "base.json").is_file():
        _build(settings, evaluation, final)
    else:
        print(f"cached base: {final}")
    report = json.loads((final / "base.json").read_text())
    if evaluation.key() not in report["evaluations"]:
        report["evaluations"][evaluation.key()] = evaluate(final / "model", evaluation)
        _write_json(final / "base.json", report)
    print(table(report["evaluations"][evaluation.key()]))
    return final / "model"


def _build(settings: BaseSettings, evaluation: EvalSettings, final: Path) -> None:
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"building {final} with {settings}", flush=True)
    count = write_training_records(settings, partial / "train.jsonl")
    training = train(settings, partial / "train.jsonl", partial / "model")
    (partial / "train.jsonl").unlink()  # regenerated from the settings at will
    report = {"settings": dataclasses.asdict(settings), "training": {"records": count, **training},
              "evaluations": {evaluation.key(): evaluate(partial / "model", evaluation)}}
    _write_json(partial / "base.json", report)
    shutil.rmtree(final, ignore_errors=True)  # a folder without base.json is a leftover, never a base
    os.replace(partial, final)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=1) + "\n")


# ---------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults, eval_defaults = BaseSettings(), EvalSettings()
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="packed rows per step")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per packed row")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--problems", type=int, default=defaults.problems,
                        help="training problems per difficulty; 0: enough for one pass over --steps")
    parser.add_argument("--style", default=defaults.style, choices=("concise", "verbose", "mixed"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval", type=int, default=eval_defaults.problems, help="problems per difficulty")
    parser.add_argument("--eval-seed", type=int, default=eval_defaults.seed)
    parser.add_argument("--max-new-tokens", type=int, default=eval_defaults.max_new_tokens)
    parser.add_argument("--eval-batch-size", type=int, default=eval_defaults.batch_size)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch threads of the training and the evaluation (the weights depend on it)")
    parser.add_argument("--root", default=str(ROOT), help="cache folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = BaseSettings(layers=args.layers, hidden=args.hidden, steps=args.steps, batch_size=args.batch_size,
                            max_length=args.max_length, lr=args.lr, warmup=args.warmup,
                            min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                            problems=args.problems, style=args.style, seed=args.seed, threads=args.threads)
    evaluation = EvalSettings(problems=args.eval, seed=args.eval_seed, max_new_tokens=args.max_new_tokens,
                              batch_size=args.eval_batch_size)
    print(build_base(settings, evaluation, Path(args.root)))


if __name__ == "__main__":
    main()
