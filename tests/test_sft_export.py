"""Exports load without the package: full, merged, LoRA and QLoRA adapters, with plain transformers and PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_tokens import CausalLMModule, ModelSpec, load_causal_lm
from lightning_tokens.modeling import base_reference
from tests.tiny import tiny_config

IDS = [[1, 17, 40, 22, 9, 101, 64, 3], [1, 5, 7, 9, 11, 13, 15, 2]]
# Random (not zero) LoRA B: the adapters change the logits, as trained ones do.
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}
KINDS = {
    "full": (ModelSpec(config=tiny_config()), False),
    "lora": (ModelSpec(config=tiny_config(), lora=LORA), False),
    "qlora": (ModelSpec(config=tiny_config(), quantization="nf4", compute_dtype="float32", lora=LORA), False),
    "merged": (ModelSpec(config=tiny_config(), lora=LORA), True),
}

# Runs in a fresh interpreter, from another directory, importing transformers and PEFT only.
RELOAD = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    root, ids = Path(sys.argv[1]), torch.tensor(eval(sys.argv[2]))
    for export in sorted(p for p in root.iterdir() if p.is_dir()):
        adapters = (export / "adapter_config.json").exists()
        model = (AutoPeftModelForCausalLM if adapters else AutoModelForCausalLM).from_pretrained(export)
        for module in model.modules():  # bitsandbytes' AVX512-BF16 CPU repacking cannot take 32-wide layers
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            torch.save(model.eval()(input_ids=ids).logits, root / (export.name + ".logits.pt"))
    assert not [name for name in sys.modules if name.startswith("lightning_tokens")]
""")


def reload_elsewhere(root, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", RELOAD, str(root), json.dumps(IDS)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@torch.no_grad()
def logits_of(module):
    module.model.eval()
    return module.model(input_ids=torch.tensor(IDS)).logits


def test_every_export_kind_reloads_with_plain_transformers_and_peft(tmp_path):
    exports, expected = tmp_path / "exports", {}
    for kind, (spec, merge) in KINDS.items():
        module = CausalLMModule(model=spec, max_new_tokens=2)
        expected[kind] = logits_of(module)
        module.export(exports / kind, merge_lora=merge)
    base = CausalLMModule(model=ModelSpec(config=tiny_config()))
    assert not torch.allclose(expected["lora"], logits_of(base), atol=1e-3)  # the adapters matter
    for kind in ("lora", "qlora"):
        config = json.loads((exports / kind / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((exports / kind / "base").resolve())
        assert not (exports / kind / "base" / "adapter_config.json").exists()
    reload_elsewhere(exports, cwd=tmp_path)
    for kind in KINDS:
        reloaded = torch.load(exports / f"{kind}.logits.pt")
        tolerance = 1e-5 if kind == "merged" else 1e-6
        torch.testing.assert_close(reloaded, expected[kind], rtol=0, atol=tolerance, msg=kind)


def test_adapters_of_a_local_base_name_its_absolute_path_and_write_no_copy(tmp_path, monkeypatch):
    model, tokenizer = load_causal_lm(ModelSpec(config=tiny_config()))
    model.save_pretrained(tmp_path / "my-base")
    tokenizer.save_pretrained(tmp_path / "my-base")
    monkeypatch.chdir(tmp_path)
    module = CausalLMModule(model=ModelSpec(name_or_path="my-base", lora=LORA))
    expected = logits_of(module)
    module.export(tmp_path / "exports" / "adapters")
    config = json.loads((tmp_path / "exports" / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "my-base").resolve())
    assert not (tmp_path / "exports" / "adapters" / "base").exists()
    reload_elsewhere(tmp_path / "exports", cwd=tmp_path / "exports")
    torch.testing.assert_close(torch.load(tmp_path / "exports" / "adapters.logits.pt"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-1.5B-Instruct", "gpt2"])
def test_a_hub_base_is_named_by_its_hub_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert base_reference(ModelSpec(name_or_path=name)) == name
    assert base_reference(ModelSpec(config=tiny_config())) is None
