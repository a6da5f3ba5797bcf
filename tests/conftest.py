"""Shared fixtures: tiny models built from config (never downloaded), small task data, fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and DDP tests run two processes side by side.
torch.set_num_threads(1)
# Denormal floats make CPU matmuls of tiny models orders of magnitude slower; flush them to zero.
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Lightning may change the thread count of the process it runs in; every test starts from one.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _as_on_an_avx512bf16_cpu(monkeypatch):
    """Every test runs as on a CPU with AVX512-BF16, whatever this one has.

    bitsandbytes gives each new 4-bit layer a ``support_avx512bf16_for_cpu`` flag from the CPU; set, it sends
    eval forwards under no_grad to a weight-repacking path (see ``lightning_tokens.quantization``). Forcing
    the flag on makes a layer the package forgets to pin fail here too: where the CPU lacks the instruction
    set, the repacked weights meet no matching kernel and give wrong numbers or raise.
    """
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    yield


@pytest.fixture(params=["fused", "chunked"])
def thought_attention_path(request, monkeypatch):
    """Both implementations of Quiet-STaR's thought attention: the fused CPU kernel and the chunks GPUs run."""
    if request.param == "chunked":
        from lightning_tokens.quiet_star import attention

        monkeypatch.setattr(attention, "fused_kernel_applies", lambda *args: False)
    return request.param


@pytest.fixture
def tokenizer():
    from lightning_tokens.data.tokenizer import load_task_tokenizer

    return load_task_tokenizer()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Hub names resolve to a tiny saved Llama and the task tokenizer: hub configs instantiate offline.

    Returns the list of hub names that were requested.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lightning_tokens.data.tokenizer import load_task_tokenizer
    from lightning_tokens.modeling import ModelSpec, load_causal_lm

    local = tmp_path / "hub-stand-in"
    model, tokenizer = load_causal_lm(ModelSpec(config={"model_type": "llama", "hidden_size": 32,
                                                        "intermediate_size": 64, "num_hidden_layers": 2}))
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)
    requested = []

    def stand_in(original):
        def from_pretrained(cls, name, *args, **kwargs):
            if not Path(str(name)).exists():
                requested.append(name)
                name = local
                kwargs.pop("trust_remote_code", None)
            return original(cls, name, *args, **kwargs)

        return classmethod(from_pretrained)

    # ModelSpec reads a hub model's config first when it is given an attn_implementation to check.
    monkeypatch.setattr(AutoConfig, "from_pretrained", stand_in(AutoConfig.from_pretrained.__func__))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        stand_in(AutoModelForCausalLM.from_pretrained.__func__))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, name, *a, **k: load_task_tokenizer()))
    return requested
