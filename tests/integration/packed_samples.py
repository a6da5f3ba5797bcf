"""Five samples of mixed lengths, padded and packed: shared by tests/integration/test_packing_methods.py and
tests/caft/ (MTP depths on packed rows)."""

from __future__ import annotations

from lightning_tokens.data.encode import Encoded, pad
from lightning_tokens.data.packing import PackedCollator
from tests.data.builders import sample

# Five samples of mixed lengths and prompts; packed as two rows of three and two samples.
SAMPLES = [sample(9, 3, 10), sample(5, 2, 11), sample(12, 4, 12), sample(7, 1, 13), sample(10, 5, 14)]
ROWS = [[0, 1, 2], [3, 4]]


def padded(samples: list[Encoded], side: str) -> dict:
    return {"input_ids": pad([s.input_ids for s in samples], 0, side),
            "attention_mask": pad([[1] * len(s.input_ids) for s in samples], 0, side),
            "labels": pad([s.labels for s in samples], -100, side)}


def packed(samples: list[Encoded]) -> dict:
    return PackedCollator(pad_token_id=0, pad_to_multiple_of=8)([[samples[i] for i in row] for row in ROWS])
