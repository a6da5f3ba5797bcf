"""Collect reasoning traces with the frozen model itself, so the predictor learns that model's own lengths.

``collect_traces`` generates a completion per prompt and returns (and optionally writes as JSONL)
``{"prompt", "completion", ...}`` records that :class:`TraceDataModule` reads. Its command line is
``lightning-tokens collect-traces --model runs/sft/export --out traces.jsonl``
(:func:`lightning_tokens.cli.commands.collect_main`).
"""

from __future__ import annotations

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


if __name__ == "__main__":
    # 0.1 ran the command here; it lives in the CLI now, which this library module does not import.
    raise SystemExit("python -m lightning_tokens.budget.traces moved: run `lightning-tokens collect-traces` "
                     "(or `python -m lightning_tokens.cli collect-traces`) with the same options")
