"""What every experiments test starts from: one torch thread, a fixed seed, no network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
