"""What the data tests build: task records and the files holding them, encoded samples and tiny models to pack them
for (also used by tests/integration/ and tests/gpu/)."""

from __future__ import annotations

import json
import random

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens.data.encode import Encoded
from tests.tiny import tiny_config

ROWS = [
    {"prompt": "Compute 1 + 2.", "completion": "<think>\n1+2=3\n</think>\nThe answer is 3.", "answer": "3"},
    {"prompt": "Compute 4 - 1.", "completion": "<think>\n4-1=3\n</think>\nThe answer is 3.", "answer": "3"},
    {"prompt": "Compute 5 + 5.", "completion": "<think>\n5+5=10\n</think>\nThe answer is 10.", "answer": "10"},
]
VOCAB = 61


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample(length: int, prompt: int, seed: int) -> Encoded:
    generator = random.Random(seed)
    ids = [generator.randrange(1, VOCAB) for _ in range(length)]
    return Encoded(ids, [-100] * prompt + ids[prompt:], prompt, f"sample {seed}")


def tiny_model(model_type: str, attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_config(model_type, vocab_size=VOCAB))
    config._attn_implementation = attention
    return AutoModelForCausalLM.from_config(config).eval()
