"""Imported once by the fork server of the evidence runs (:mod:`protocols.jobs`): one thread, then every heavy import.

The server forks every run, so each starts with these modules loaded. One thread is set before torch loads: a
forked process must not inherit a running OpenMP pool.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

import lightning.pytorch  # noqa: E402,F401
import peft  # noqa: E402,F401
import transformers  # noqa: E402,F401

import lightning_tokens  # noqa: E402,F401
from lightning_tokens.budget import BudgetGuidanceLogitsProcessor  # noqa: E402,F401
