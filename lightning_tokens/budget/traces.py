"""Collect reasoning traces with the frozen model itself, so the predictor learns that model's own lengths.

``collect_traces`` generates a completion per prompt and returns (and optionally writes as JSONL)
``{"prompt", "completion", ...}`` records that :class:`TraceDataModule` reads. ``collect_main`` is its
command line: ``python -m lightning_tokens.budget.traces --model runs/sft/export --out traces.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_tokens.budget.data import think_token_id, write_jsonl
from lightning_tokens.checks import check_numbers
from lightning_tokens.modeling import inference_kwargs
from lightning_tokens.reasoning import THINK_END, THINK_START, check_answer, thinking_length


@torch.no_grad()
def collect_traces(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | dict[str, Any]],
                   path: Optional[str | Path] = None, max_new_tokens: int = 1024, batch_size: int = 8,
                   do_sample: bool = False, temperature: float = 1.0, think_start: Optional[str] = THINK_START,
                   think_end: str = THINK_END, **generate_kwargs: Any) -> list[dict[str, Any]]:
    """Generate one trace per prompt with ``model``.

    Args:
        model: The frozen causal LM (a mixture-of-experts one generates without router logits).
        tokenizer: Its tokenizer (prompts are encoded with its special tokens, e.g. bos).
        prompts: Prompt texts, or records with a ``"prompt"`` (other fields such as ``"answer"`` are kept).
        path: Write the records here as JSONL. Default ``None``.
        max_new_tokens: Longest completion. Default ``1024``.
        batch_size: Prompts per ``generate()`` call. Default ``8``.
        do_sample: Sample instead of greedy decoding. Default ``False``.
        temperature: Sampling temperature. Default ``1.0``.
        think_start: Marker opening thinking (for the ``thinking_length`` field), or ``None``. Default ``"<think>"``.
        think_end: Marker closing thinking. Default ``"</think>"``.
        **generate_kwargs: More ``generate()`` arguments.

    Returns:
        Records with ``prompt``, ``completion``, ``finished`` (a ``</think>`` was generated),
        ``thinking_length`` and, when the prompt record had an ``answer``, ``correct``.
    """
    check_numbers("collect_traces", max_new_tokens=(max_new_tokens, "an integer >= 1"),
                  batch_size=(batch_size, "an integer >= 1"), temperature=(temperature, "> 0"))
    records = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    start_id = think_token_id(tokenizer, think_start, "think_start") if think_start else None
    end_id = think_token_id(tokenizer, think_end, "think_end")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    try:
        for first in range(0, len(records), batch_size):
            chunk = records[first: first + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True).to(model.device)
            more = {**inference_kwargs(model), **generate_kwargs}
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                       temperature=temperature if do_sample else None,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **more)
            for record, ids in zip(chunk, generated[:, enc["input_ids"].shape[1]:].tolist()):
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(ids, skip_special_tokens=True)
                row = {**record, "completion": text, "finished": end_id in ids,
                       "thinking_length": thinking_length(ids, start_id, end_id) if start_id is not None else
                       (ids.index(end_id) if end_id in ids else len(ids))}
                if record.get("answer") is not None:
                    row["correct"] = check_answer(text, record["answer"])
                out.append(row)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    if path is not None:
        write_jsonl(out, path)
    return out


def collect_main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: traces of a saved model on the embedded task's prompts (or a JSONL of prompts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_tokens.data.reasoning_task import ReasoningTask
    from lightning_tokens.data.records import READERS, DataError

    parser = argparse.ArgumentParser(description=collect_main.__doc__)
    parser.add_argument("--model", required=True, help="hub name or directory of the frozen LM")
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument("--prompts", help="JSONL/JSON/parquet of records with 'prompt' (default: the embedded task)")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--num", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        from lightning_tokens.data.tokenizer import load_task_tokenizer

        tokenizer = load_task_tokenizer()
    if args.prompts:
        path = Path(args.prompts)
        if path.suffix.lower() not in READERS or not path.exists():
            raise DataError(f"{path}: need an existing .jsonl, .json or .parquet file of records with 'prompt'")
        prompts = [r.fields for r in READERS[path.suffix.lower()](path)]
        missing = [i for i, p in enumerate(prompts) if not isinstance(p, dict) or not isinstance(p.get("prompt"), str)]
        if missing:
            raise DataError(f"{path}: record {missing[0]} has no string field 'prompt'")
    else:
        prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in ReasoningTask(style="mixed").records(args.split)]
    rows = collect_traces(model, tokenizer, prompts[: args.num], args.out, args.max_new_tokens, args.batch_size,
                          args.sample, args.temperature)
    done = sum(r["finished"] for r in rows)
    print(f"wrote {len(rows)} traces to {args.out} ({len(rows) - done} without </think>)")


if __name__ == "__main__":
    collect_main()
