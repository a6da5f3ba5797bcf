"""Quiet-STaR as its paper ran it: continued pretraining of the base on plain text, against plain LM training.

From the pretrained base, on the same text in the same order (per seed):

- ``quiet_star``: Quiet-STaR for ``steps`` optimiser steps (:class:`QuietSTaRModule`, the paper's loss);
- ``plain_steps``: plain next-token training for the same number of steps (equal steps);
- ``plain_compute``: plain next-token training for as many steps as Quiet-STaR's compute buys (equal compute):
  ``passes = 1 + n_thoughts * (thought_length + n_ahead_talk + 1)`` steps per Quiet-STaR step (29 at the
  paper's settings). A Quiet-STaR step runs that many forward passes over the batch's tokens (the text pass,
  then ``thought_length + 1`` thought passes and ``n_ahead_talk`` talk passes on ``n_thoughts`` copies of the
  rows), each with its backward, where a plain step runs one. This is a FLOP count by token-passes, reproducible
  on a shared machine where wall time is not. It leaves out that every thought pass also reads the keys of the
  passes before it, and the small vocabulary projections, so it undercounts Quiet-STaR's FLOPs (plain training
  gets a little less compute than Quiet-STaR used). Wall times are recorded too.
- ``base``: the base itself, no training;
- ``quiet_star_ablation`` (first seed only): Quiet-STaR with policy weight 1 instead of 1e6. At 1e6 the
  REINFORCE term is ~2,000-3,000 of a loss whose NLL part is under 1 (last steps of the runs of 2026-12-02), so
  under the gradient clip of 1 it most likely sets the direction of every shared weight (gradient norms were not
  measured); this run shows what the thoughts and the mixing head do when the NLL dominates (the older
  from-scratch experiment diverged at 1e6 and used 1).

Evaluation, on held-out documents in the same format (whole documents, not crops): per-token NLL without
thoughts (the plain forward; for Quiet-STaR the same forward with the two delimiter tokens masked out, as its
generation does) and, for Quiet-STaR, with thoughts: one greedy thought at every position, the mixed prediction
of the next token (talk step 0), as the paper scores perplexity. Averaged over five token sets:

- ``all``: every target token (every real token after bos); ``completion``: the tokens after the prompt
  (eos included), the only ones the base was trained to predict;
- ``top decile``: the 10% of all target tokens with the highest loss under the BASE model, chosen once (ties by
  position), the paper's "difficult tokens". In this text most of them are prompt tokens: the base never had a
  loss on prompts, and their operand digits are random, which no thought can predict (floor ln 10 = 2.30 nats),
  so a second set is reported:
- ``top decile (completion)``: the 10% of completion tokens (after the prompt, eos included) with the highest
  base loss, chosen the same way;
- ``answer digits``: the digits of the final answer after "The answer is".

Protocol choices and why:

- Text: the sequences the base was trained on, ``bos + prompt + completion + eos`` (:func:`encode_record`), as
  plain text with a loss on every token (the prompt's too: Quiet-STaR trains on raw text). ``PlainTextDataModule``
  renders the task's corpus as ``prompt + "\\n" + completion`` with no eos, a format the base has never seen, so
  its documents are replaced here (a subclass that keeps its batching and packing). Problems: ``easy``,
  ``medium`` and ``hard`` in equal numbers, style ``mixed`` (as the base), task seeds 300, 301, 302 (the base
  used 100-102); the held-out documents are the ``val`` split of the same seeds, and training problems whose
  prompt is held out are dropped.
- Crops: the first 256 tokens of each document (the paper's 256-token crops), packed into rows of 256 tokens
  so that no compute goes to padding; thoughts never read another document of the row.
- Thoughts: the paper's training settings: 2 thoughts per position, ``thought_length`` 9 (the reference's
  ``n_ahead`` 12 with the text pass and both delimiters), 4 talk tokens, delimiters initialised from ``"---"``
  with a 100x learning rate, mixed NLL weight 0.5, policy weight 1e6, REINFORCE at temperature 3, thoughts
  sampled at temperature 1, thoughts at every position.
- Optimiser: AdamW, weight decay 0.001, gradient clip 1, linear warm-up then constant (the paper's). Deviations,
  all forced by the budget (about 24 CPU-minutes for the part): lr ``2e-4`` instead of 1e-6 (the base's last
  learning rate; at 1e-6 nothing moves in a few dozen steps on this model), 2 rows of 256 tokens per step instead
  of 8, 24 steps instead of about 100, warm-up 5 steps (20% of the steps, as the paper's 20 of ~100). On one
  CPU thread a Quiet-STaR step took ~8 CPU-seconds, a plain step ~0.25 (33x); 24 steps are what fits.
- Both plain runs use the same optimiser, schedule (warm-up steps included) and batches: their first 24
  batches are Quiet-STaR's; the equal-compute run goes on through more of the same text.
- Seeds: 2 by default (0, 1): the seed sets the data order, the thoughts sampled and the mixing head's
  initialisation; the held-out documents and difficult tokens are the same for all.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.protocols.jobs import cpu_trainer, in_process_step, run_all, same_settings
from lightning_tokens.files import atomic_path

#: The part's settings (see the module docstring for why).
SETTINGS = dict(
    task_seed=300, train_per_difficulty=1000, eval_per_difficulty=32, style="mixed", max_length=256,
    batch_size=2, steps=24, warmup=5, lr=2e-4, weight_decay=0.001, n_thoughts=2, thought_length=9,
    n_ahead_talk=4, policy_weight=1e6, ablation_policy_weight=1.0, difficult_fraction=0.1, eval_batch_size=8,
)
#: A smoke run: checks the pipeline, not the method.
QUICK = dict(train_per_difficulty=40, eval_per_difficulty=3, max_length=128, batch_size=1, steps=2, warmup=1)
SEEDS = (0, 1)
METHODS = ("quiet_star", "plain_compute", "plain_steps")
#: Run on the first seed only: Quiet-STaR with ``ablation_policy_weight`` instead of the paper's 1e6.
ABLATION = "quiet_star_ablation"
DIFFICULTIES = ("easy", "medium", "hard")
#: Token sets of the evaluation, in table order.
SETS = ("all", "completion", "top_decile", "top_decile_completion", "answer_digits")


# ---------------------------------------------------------------- data


def records(settings: dict[str, Any], split: str) -> list[dict[str, str]]:
    """Fresh problems of every difficulty (difficulty ``i`` from task seed ``task_seed + i``), interleaved.

    Args:
        settings: The part's settings (``task_seed``, ``style``, ``train_per_difficulty``, ``eval_per_difficulty``).
        split: ``"train"`` (training problems, held-out prompts dropped) or ``"val"`` (the held-out ones).
    """
    from lightning_tokens import ReasoningTask

    def of(split_name: str) -> list[list[dict[str, str]]]:
        count = settings["train_per_difficulty" if split_name == "train" else "eval_per_difficulty"]
        sizes = dict(num_train=count, num_val=0) if split_name == "train" else dict(num_train=0, num_val=count)
        return [ReasoningTask.preset(name, style=settings["style"], seed=settings["task_seed"] + i, **sizes)
                .records(split_name) for i, name in enumerate(DIFFICULTIES)]

    if split == "val":
        return [record for group in of("val") for record in group]
    held_out = {record["prompt"] for group in of("val") for record in group}
    return [record for group in zip(*of("train")) for record in group if record["prompt"] not in held_out]


def document(tokenizer, record: dict[str, str]) -> tuple[list[int], int]:
    """``bos + prompt + completion + eos`` ids of a record (the base's training sequence) and its prompt length."""
    from lightning_tokens.data.encode import encode_record
    from lightning_tokens.data.records import Record

    encoded = encode_record(tokenizer, Record(record, "quiet_star"))
    return encoded.input_ids, encoded.prompt_length


def text_data_module(settings: dict[str, Any], seed: int):
    """A :class:`PlainTextDataModule` whose documents are the base's sequences, cropped and packed.

    Args:
        settings: The part's settings (``max_length``, ``batch_size`` and those of :func:`records`).
        seed: Seed of the data order.
    """
    from lightning_tokens.quiet_star.data import PlainTextDataModule

    class SequenceText(PlainTextDataModule):
        """Documents ``bos + prompt + completion + eos`` (every token a target), not the task's corpus."""

        def setup(self, stage: Optional[str] = None) -> None:
            if self.train_docs:
                return
            self.tokenizer = self.trainer.lightning_module.tokenizer
            docs = (document(self.tokenizer, record)[0][: self.max_length] for record in records(settings, "train"))
            self.train_docs = [doc for doc in docs if len(doc) >= 2]
            self.val_docs = []  # evaluated separately, on whole documents

    return SequenceText(max_length=settings["max_length"], batch_size=settings["batch_size"], seed=seed,
                        packing=True)


# ---------------------------------------------------------------- difficult tokens


def top_fraction(losses: Sequence[Sequence[float]], candidates: Sequence[Sequence[int]],
                 fraction: float) -> list[list[int]]:
    """Per document, the candidate positions among the ``fraction`` of all candidates with the highest loss.

    ``round(fraction * count)`` positions are chosen over all documents together; ties go to the earlier
    document, then the earlier position. Returns each document's chosen positions in increasing order.

    Args:
        losses: Per document, the loss of each position (indexed by position).
        candidates: Per document, the positions that may be chosen.
        fraction: Share of the candidates to choose, in [0, 1].
    """
    import torch

    flat = [(doc, position) for doc, positions in enumerate(candidates) for position in positions]
    values = torch.tensor([float(losses[doc][position]) for doc, position in flat], dtype=torch.float64)
    count = round(fraction * len(flat))
    order = torch.sort(-values, stable=True).indices[:count].tolist()
    chosen: list[list[int]] = [[] for _ in candidates]
    for index in sorted(order):
        doc, position = flat[index]
        chosen[doc].append(position)
    return chosen


def answer_digit_positions(tokenizer, ids: Sequence[int]) -> list[int]:
    """Positions of the final answer's digit tokens: the digits right after the last ``answer is`` (sign skipped).

    Args:
        tokenizer: The tokenizer of ``ids``.
        ids: A document's token ids.
    """
    pieces = [tokenizer.decode([token]) for token in ids]
    text, starts = "", []
    for piece in pieces:
        starts.append(len(text))
        text += piece
    anchor = text.rfind("answer is")
    if anchor < 0:
        return []
    positions = []
    for position in range(len(ids)):
        if starts[position] < anchor + len("answer is"):
            continue
        piece = pieces[position].strip()
        if piece.isdigit():
            positions.append(position)
        elif positions or piece not in ("", "-"):
            break
    return positions


def mean_over(nll: Sequence[Sequence[float]], positions: Sequence[Sequence[int]]) -> float:
    """Mean of ``nll[doc][position]`` over every chosen position of every document (NaN if none).

    Args:
        nll: Per document, the NLL of the token at each position (position 0, never a target, unused).
        positions: Per document, the chosen target positions.
    """
    values = [nll[doc][position] for doc, chosen in enumerate(positions) for position in chosen]
    return sum(values) / len(values) if values else float("nan")


def build_heldout(base: str, settings: dict[str, Any], out: Path) -> Path:
    """The held-out documents and their token sets (difficult ones chosen from the base's loss), built once.

    Writes ``out/heldout.json`` (through a temporary file): ``docs`` (ids), ``sets`` (per set, per document, the
    target positions) and ``stats``. A position ``t`` stands for the prediction of token ``t`` from ``ids[:t]``.

    Args:
        base: The base model's directory.
        settings: The part's settings.
        out: The part's output folder.
    """
    import torch

    from lightning_tokens.modeling import ModelSpec, load_frozen_causal_lm

    target = out / "heldout.json"
    if target.is_file():
        return target
    model, tokenizer = load_frozen_causal_lm(ModelSpec(name_or_path=base))
    docs, prompt_lengths = zip(*(document(tokenizer, record) for record in records(settings, "val")))
    with torch.no_grad():
        base_nll = token_nll(model, list(docs), settings["eval_batch_size"])
    every = [list(range(1, len(doc))) for doc in docs]
    completion = [list(range(start, len(doc))) for doc, start in zip(docs, prompt_lengths)]
    fraction = settings["difficult_fraction"]
    sets = {"all": every, "completion": completion, "top_decile": top_fraction(base_nll, every, fraction),
            "top_decile_completion": top_fraction(base_nll, completion, fraction),
            "answer_digits": [answer_digit_positions(tokenizer, doc) for doc in docs]}
    in_prompt = sum(p < start for chosen, start in zip(sets["top_decile"], prompt_lengths) for p in chosen)
    stats = {"documents": len(docs), **{f"tokens_{name}": sum(map(len, chosen)) for name, chosen in sets.items()},
             "top_decile_in_prompt": in_prompt / max(1, sum(map(len, sets["top_decile"])))}
    with atomic_path(target) as temporary:
        temporary.write_text(json.dumps({"docs": [list(doc) for doc in docs], "sets": sets, "stats": stats}))
    return target


# ---------------------------------------------------------------- evaluation


def _batches(docs: list[list[int]], batch_size: int):
    """Documents in batches of similar length: ``(indices, input_ids, attention_mask)``, right-padded."""
    from lightning_tokens.data.encode import pad

    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        rows = [docs[i] for i in indices]
        yield indices, pad(rows, 0), pad([[1] * len(row) for row in rows], 0)


def _per_position(log_probs, input_ids, mask, indices, docs, out) -> None:
    """Store ``-log p(x_t | x_<t)`` at position ``t`` of each document (position 0 gets 0.0)."""
    import torch

    nll = -log_probs[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    nll = torch.nn.functional.pad(nll, (1, 0))
    for row, doc in enumerate(indices):
        out[doc] = nll[row, : len(docs[doc])].tolist()


def token_nll(model, docs: list[list[int]], batch_size: int, forbidden=None) -> list[list[float]]:
    """Per document, the plain (thought-free) NLL of every token (position 0: 0.0).

    Args:
        model: A causal LM.
        docs: Token ids per document.
        batch_size: Documents per forward.
        forbidden: Token ids masked out of the distribution (Quiet-STaR's delimiters). Default ``None``.
    """
    from lightning_tokens.quiet_star.parallel import forbid

    out: list[list[float]] = [[] for _ in docs]
    for indices, ids, mask in _batches(docs, batch_size):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        if forbidden is not None:
            logits = forbid(logits, forbidden)
        _per_position(logits.log_softmax(-1), ids, mask, indices, docs, out)
    return out


def thought_nll(module, docs: list[list[int]], batch_size: int) -> list[list[float]]:
    """Per document, the NLL of every token under Quiet-STaR's mixed prediction after one greedy thought.

    Args:
        module: A :class:`QuietSTaRModule`.
        docs: Token ids per document.
        batch_size: Documents per forward.
    """
    from lightning_tokens.quiet_star import parallel_thoughts
    from lightning_tokens.quiet_star.parallel import forbid

    lm, head = module.lm, module.lm.get_output_embeddings()
    start, end = module.thought_embeddings()
    out: list[list[float]] = [[] for _ in docs]
    for indices, ids, mask in _batches(docs, batch_size):
        passes = parallel_thoughts(lm, ids, mask, start, end, module.forbidden_ids, 1, module.thought_length, 1,
                                   temperature=0.0)
        mixed, _ = module.mixing_head(passes.base_hidden, passes.talk_hidden[0])
        _per_position(forbid(head(mixed), module.forbidden_ids).float().log_softmax(-1), ids, mask, indices,
                      docs, out)
    return out


def summarise(nll: list[list[float]], sets: dict[str, list[list[int]]]) -> dict[str, float]:
    """Mean NLL over every token set of the evaluation."""
    return {name: mean_over(nll, sets[name]) for name in SETS}


# ---------------------------------------------------------------- runs


def passes_per_step(settings: dict[str, Any]) -> int:
    """Forward (and backward) token-passes of one Quiet-STaR step, in plain steps: the equal-compute ratio."""
    return 1 + settings["n_thoughts"] * (settings["thought_length"] + settings["n_ahead_talk"] + 1)


def run_one(method: str, seed: int, base: str, settings: dict[str, Any], heldout: str) -> dict:
    """Train the base with ``method`` on the seed's text order, then evaluate on the held-out token sets.

    Args:
        method: ``"base"`` (no training), ``"quiet_star"``, ``"quiet_star_ablation"`` (policy weight
            ``ablation_policy_weight``), ``"plain_steps"`` or ``"plain_compute"``.
        seed: Seed of the data order, the thoughts sampled and the mixing head's initialisation.
        base: The base model's directory.
        settings: The part's settings.
        heldout: The file written by :func:`build_heldout`.
    """
    import lightning.pytorch as pl
    import torch

    from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig
    from lightning_tokens.quiet_star import QuietSTaRModule

    pl.seed_everything(seed, verbose=False)
    held = json.loads(Path(heldout).read_text())
    optimizer = OptimizerConfig(lr=settings["lr"], weight_decay=settings["weight_decay"],
                                warmup=settings["warmup"], schedule="constant")
    spec = ModelSpec(name_or_path=base, seed=seed)
    quiet = method in ("quiet_star", ABLATION)
    if quiet:
        weight = settings["ablation_policy_weight" if method == ABLATION else "policy_weight"]
        module = QuietSTaRModule(spec, optimizer, n_thoughts=settings["n_thoughts"],
                                 thought_length=settings["thought_length"], n_ahead_talk=settings["n_ahead_talk"],
                                 policy_weight=weight, generation_batches=0)
    else:
        module = CausalLMModule(spec, optimizer, max_new_tokens=0)
    steps = {"base": 0, "quiet_star": settings["steps"], ABLATION: settings["steps"], "plain_steps": settings["steps"],
             "plain_compute": settings["steps"] * passes_per_step(settings)}[method]
    started, cpu_started = time.time(), time.process_time()
    metrics: dict[str, float] = {}
    if steps:
        trainer = cpu_trainer([_progress(max(1, steps // 8))], max_steps=steps)
        trainer.fit(module, datamodule=text_data_module(settings, seed))
        if trainer.global_step < steps:
            raise RuntimeError(f"{method}: stopped at step {trainer.global_step} of {steps}")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    train_seconds, train_cpu = time.time() - started, time.process_time() - cpu_started
    module.eval()
    docs, sets = held["docs"], held["sets"]
    batch = settings["eval_batch_size"]
    with torch.no_grad():
        plain = summarise(token_nll(module.model, docs, batch, module.forbidden_ids if quiet else None), sets)
        thought = summarise(thought_nll(module, docs, batch), sets) if quiet else None
    result = dict(method=method, seed=seed, steps=steps, token_passes=steps * (
        passes_per_step(settings) if quiet else 1), train_seconds=round(train_seconds, 1),
        train_cpu_seconds=round(train_cpu, 1),
        eval_seconds=round(time.time() - started - train_seconds, 1), plain=plain, thought=thought,
        train_metrics=metrics)
    if method == "base":
        result["heldout"] = held["stats"]
    return result


def _progress(every: int):
    """A callback printing the step, the loss and the minutes so far every ``every`` steps (for the run's log)."""
    import lightning.pytorch as pl

    class Progress(pl.Callback):
        def on_train_start(self, trainer, module) -> None:
            self.started = time.time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if trainer.global_step % every == 0 or trainer.global_step == trainer.max_steps:
                print(f"step {trainer.global_step}/{trainer.max_steps}  loss {float(outputs['loss']):.4g}  "
                      f"{(time.time() - self.started) / 60:.1f} min", flush=True)

    return Progress()


def run_part(base: Path, out: Path, jobs: int, quick: bool, seeds: Optional[list[int]]) -> str:
    """Run the whole part (held-out sets, the base, every method and seed) and return its markdown table.

    Args:
        base: The pretrained base's model directory.
        out: Output folder (results cached there, one JSON per run; the held-out sets as ``heldout.json``).
        jobs: Runs side by side, one thread each.
        quick: Shrink everything to a smoke run (:data:`QUICK`, one seed).
        seeds: Seeds to run; ``None``: :data:`SEEDS` (``(0,)`` when ``quick``).
    """

    settings = {**SETTINGS, **(QUICK if quick else {})}
    seeds = list(seeds) if seeds is not None else ([0] if quick else list(SEEDS))
    same_settings(out, {"base": str(base), **settings})  # refuses a folder cached under other settings
    with in_process_step():
        heldout = build_heldout(str(base), settings, out)
    common = dict(base=str(base), settings=settings, heldout=str(heldout))
    runs = [(f"{method}-{seed}", dict(method=method, seed=seed, **common)) for method in METHODS for seed in seeds]
    runs.insert(len(seeds), (f"{ABLATION}-{seeds[0]}", dict(method=ABLATION, seed=seeds[0], **common)))  # long first
    runs.append(("base-0", dict(method="base", seed=0, **common)))
    results = run_all("quiet_star", runs, out, jobs)
    return table(results, settings)


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict], settings: dict[str, Any]) -> str:
    """Markdown: held-out NLL (nats, mean ± sd over seeds) per token set, each model without and with thoughts."""
    ratio = passes_per_step(settings)
    names = {"base": "base (no training)", "plain_steps": f"plain LM, {settings['steps']} steps (equal steps)",
             "plain_compute": f"plain LM, {settings['steps'] * ratio} steps (equal compute)",
             "quiet_star": f"Quiet-STaR, {settings['steps']} steps",
             ABLATION: f"Quiet-STaR, {settings['steps']} steps, policy weight {settings['ablation_policy_weight']:g}"}
    lines = ["| model | thoughts | seeds | train min | NLL all | NLL completion | top decile | "
             "top decile (completion) | answer digits |", "|---|---|---|---|---|---|---|---|---|"]
    for method in ("base", "plain_steps", "plain_compute", "quiet_star", ABLATION):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        minutes = statistics.mean(r["train_seconds"] for r in rows) / 60
        for kind in ("plain", "thought"):
            if rows[0][kind] is None:
                continue
            cells = " | ".join(_cell([r[kind][name] for r in rows]) for name in SETS)
            lines.append(f"| {names[method]} | {'greedy thought' if kind == 'thought' else 'none'} | {len(rows)} | "
                         f"{minutes:.1f} | {cells} |")
    stats = next((r["heldout"] for r in results if r["method"] == "base"), None)
    if stats:
        lines.append("")
        lines.append(f"Held-out: {stats['documents']} documents; tokens per set: all {stats['tokens_all']}, "
                     f"completion {stats['tokens_completion']}, "
                     f"top decile {stats['tokens_top_decile']} ({stats['top_decile_in_prompt']:.0%} of them in "
                     f"prompts), top decile (completion) {stats['tokens_top_decile_completion']}, answer digits "
                     f"{stats['tokens_answer_digits']}. One Quiet-STaR step = {ratio} plain steps of token-passes.")
    for method in ("quiet_star", ABLATION):
        quiet = [r for r in results if r["method"] == method and r["train_metrics"]]
        if quiet:
            last = {name: statistics.mean(r["train_metrics"].get(f"train/{name}", math.nan) for r in quiet)
                    for name in ("mixing_weight", "reward", "policy_loss", "base_nll", "mixed_nll")}
            parts = ", ".join(f"{name} {value:.4g}" for name, value in last.items())
            lines.append(f"{names[method]} at its last step (training batch, mean over seeds): {parts}.")
    return "\n".join(lines)
