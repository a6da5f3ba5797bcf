"""Self-distilled stage-1 data: the base model answers the prompts itself, the answers become the targets.

CAFT pre-trains its heads on the base model's own responses, so the heads learn to predict what the model
would say next rather than what a dataset says. :func:`self_distill` writes ``{"prompt", "completion"}``
records to a JSONL that :class:`~lightning_tokens.SFTDataModule` reads as ``train_file``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_tokens.checks import check_numbers
from lightning_tokens.data.encode import prompt_ids
from lightning_tokens.files import atomic_path
from lightning_tokens.modeling import causal_lm_of, inference_kwargs


@torch.no_grad()
def self_distill(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
                 path: str | os.PathLike, max_new_tokens: int = 256, batch_size: int = 16,
                 do_sample: bool = False, temperature: float = 1.0, seed: Optional[int] = 0) -> Path:
    """Generate the base model's completion of every prompt and write them as JSONL records.

    Args:
        model: The base causal LM (the one whose heads stage 1 trains).
        tokenizer: Its tokenizer (needs a pad token).
        prompts: Prompt texts, as in the ``prompt`` field of SFT records.
        path: Output ``.jsonl``; written whole through a temporary file, so no partial file is left.
        max_new_tokens: Longest completion. Default ``256``.
        batch_size: Prompts per ``generate`` call (left-padded). Default ``16``.
        do_sample: Sample instead of greedy decoding. Default ``False``.
        temperature: Sampling temperature when ``do_sample``. Default ``1.0``.
        seed: Seed of sampling. Default ``0``.

    Returns:
        The path written. Completions that reach ``max_new_tokens`` without eos are kept as they are; empty
        ones are left out (all empty raises ``ValueError``).
    """
    check_numbers("self_distill", max_new_tokens=(max_new_tokens, "an integer >= 1"),
                  batch_size=(batch_size, "an integer >= 1"), temperature=(temperature, "> 0"),
                  seed=(seed, "an integer or None"))
    prompts = list(prompts)
    if not prompts:
        raise ValueError("self_distill: no prompts given")
    if tokenizer.pad_token_id is None:
        raise ValueError("self_distill: the tokenizer has no pad token; set tokenizer.pad_token")
    base = causal_lm_of(model)
    device = base.get_output_embeddings().weight.device
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    path = Path(path)
    skipped = 0
    try:
        with atomic_path(path) as tmp, tmp.open("w") as out:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                encoded = [prompt_ids(tokenizer, p) for p in chunk]
                width = max(len(ids) for ids in encoded)
                input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, ids in enumerate(encoded):
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    attention_mask[row, width - len(ids):] = 1
                options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **inference_kwargs(model))
                if do_sample:
                    options["temperature"] = temperature
                output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                        **options)
                for prompt, row in zip(chunk, output[:, width:].tolist()):
                    if tokenizer.eos_token_id in row:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    completion = tokenizer.decode(row, skip_special_tokens=True)
                    if not completion.strip():
                        skipped += 1  # an empty answer is no training target
                        continue
                    out.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            if skipped == len(prompts):  # raised inside the block: nothing is written
                raise ValueError(f"self_distill: the model answered every one of the {len(prompts)} prompts with "
                                 "nothing")
    finally:
        model.train(was_training)
    return path
