"""Every public import path of 0.1 still imports, and the renamed ones give the very objects of their new home.

The lists below are the 0.1 tree (``git ls-tree -r 9719c32 lightning_tokens``) and its packages' ``__all__``, written
out so that a later rename cannot quietly change what is checked.
"""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_tokens._renamed import alias

ROOT = Path(__file__).resolve().parents[1]

# 0.1 module -> the module it is now.
RENAMED = {
    "lightning_tokens.module": "lightning_tokens.sft",
    "lightning_tokens.selection": "lightning_tokens.sstoken",
    "lightning_tokens.selection.attention": "lightning_tokens.sstoken.attention",
    "lightning_tokens.selection.callback": "lightning_tokens.sstoken.callback",
    "lightning_tokens.selection.history": "lightning_tokens.sstoken.history",
    "lightning_tokens.selection.scores": "lightning_tokens.sstoken.formulas",
    "lightning_tokens.selection.scoring": "lightning_tokens.sstoken.precompute",
    "lightning_tokens.heads": "lightning_tokens.caft",
    **{f"lightning_tokens.heads.{name}": f"lightning_tokens.caft.{name}" for name in (
        "callback", "distill", "heads", "loss", "module", "mtp", "mtp_drafter", "schedule", "speculative")},
    "lightning_tokens.thoughts": "lightning_tokens.quiet_star",
    "lightning_tokens.thoughts.heads": "lightning_tokens.quiet_star.mixing",
    **{f"lightning_tokens.thoughts.{name}": f"lightning_tokens.quiet_star.{name}" for name in (
        "attention", "data", "fused_attention", "generate", "loss", "module", "parallel", "positions")},
}

# 0.1 modules still at their place.
KEPT = [
    "lightning_tokens", "lightning_tokens.checkpoints", "lightning_tokens.cli", "lightning_tokens.lean_loss",
    "lightning_tokens.modeling", "lightning_tokens.optim", "lightning_tokens.predict", "lightning_tokens.quantization",
    "lightning_tokens.sharding", "lightning_tokens.token_loss",
    *(f"lightning_tokens.budget{name}" for name in ("", ".calibration", ".capture", ".data", ".forcing", ".gamma",
                                                    ".guidance", ".module", ".predictor", ".traces", ".tracking")),
    *(f"lightning_tokens.data{name}" for name in ("", ".encode", ".packing", ".reasoning_task", ".records",
                                                  ".tokenizer")),
]

# The public names (``__all__``) of each 0.1 package.
PUBLIC = {
    "lightning_tokens": [
        "BudgetForcing", "BudgetGuidanceLogitsProcessor", "BudgetPredictor", "BudgetPredictorModule", "CausalLMModule",
        "ConceptAwareFineTuning", "LogitsNotKept", "ModelSpec", "MultiTokenHeads", "MultiTokenHeadsModule",
        "OptimizerConfig", "PackedCollator", "PackingError", "PlainLoss", "PlainTextDataModule", "PredictionWriter",
        "PredictorConfig", "QuietSTaRModule", "ReasoningTask", "SFTDataModule", "TokenLossCallback",
        "TokenLossContext", "TokenLossDispatcher", "TokenSelection", "TraceDataModule", "check_answer",
        "collect_traces", "estimate_thinking_length", "extract_answer", "export_mtp", "generate_with_heads",
        "keep_4bit_weights_unpacked", "load_causal_lm", "load_task_tokenizer", "self_distill", "thoughtful_generate"],
    "lightning_tokens.module": ["CausalLMModule"],
    "lightning_tokens.selection": ["LossTable", "TokenSelection", "score_main"],
    "lightning_tokens.heads": [
        "ConceptAwareFineTuning", "HeadLoss", "MultiTokenHeads", "MultiTokenHeadsModule", "ResBlock",
        "SpeculativeStats", "Trunk", "capture_trunk", "export_mtp", "generate_with_heads", "head_losses",
        "schedule_value", "self_distill"],
    "lightning_tokens.thoughts": [
        "MixingHead", "QuietSTaRLoss", "QuietSTaRModule", "ThoughtEmbeddings", "ThoughtPasses", "ThoughtfulOutput",
        "next_token_targets", "parallel_thoughts", "quiet_star_loss", "thoughtful_generate"],
}


@pytest.mark.parametrize("old,new", RENAMED.items(), ids=list(RENAMED))
def test_a_renamed_module_is_the_new_module_under_its_old_name(old, new):
    module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is module  # `from parent import child` too


@pytest.mark.parametrize("name", KEPT)
def test_a_kept_module_imports_under_its_name(name):
    assert importlib.import_module(name).__name__ == name


@pytest.mark.parametrize("package", PUBLIC)
def test_every_public_name_of_01_is_there_and_is_the_new_object(package):
    old = importlib.import_module(package)
    new = importlib.import_module(RENAMED.get(package, package))
    missing = [name for name in PUBLIC[package] if not hasattr(old, name)]
    assert not missing, f"{package} lost {missing}"
    assert all(getattr(old, name) is getattr(new, name) for name in PUBLIC[package])


def test_a_0_1_submodule_imported_first_in_a_fresh_interpreter_is_the_new_one():
    # Nothing of the new names imported before: the old path alone has to set everything up.
    code = """
import lightning_tokens.selection.history as history
from lightning_tokens.selection.scoring import LossTable
from lightning_tokens.thoughts.heads import MixingHead
from lightning_tokens.heads.heads import MultiTokenHeads
import lightning_tokens.sstoken.history, lightning_tokens.sstoken.loss_table, lightning_tokens.quiet_star.mixing
import lightning_tokens.caft.heads
assert history is lightning_tokens.sstoken.history
assert LossTable is lightning_tokens.sstoken.loss_table.LossTable
assert MixingHead is lightning_tokens.quiet_star.mixing.MixingHead
assert MultiTokenHeads is lightning_tokens.caft.heads.MultiTokenHeads
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_pickle_naming_an_old_path_loads_the_new_class():
    from lightning_tokens.sft import CausalLMModule
    from lightning_tokens.sstoken.callback import TokenSelection

    # Protocol 0's GLOBAL opcode names the class by module path, as a 0.1 pickle of it does.
    assert pickle.loads(b"clightning_tokens.selection.callback\nTokenSelection\n.") is TokenSelection
    assert pickle.loads(b"clightning_tokens.module\nCausalLMModule\n.") is CausalLMModule


def test_a_config_naming_old_class_paths_still_instantiates(tmp_path):
    from lightning_tokens.cli import build_cli
    from lightning_tokens.sft import CausalLMModule
    from lightning_tokens.sstoken.callback import TokenSelection

    config = yaml.safe_load((ROOT / "lightning_tokens/configs/sstoken/tiny.yaml").read_text())
    assert config["trainer"]["callbacks"][0]["class_path"] == "lightning_tokens.sstoken.TokenSelection"
    config["trainer"]["callbacks"][0]["class_path"] = "lightning_tokens.selection.TokenSelection"
    config["model"]["class_path"] = "lightning_tokens.module.CausalLMModule"
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path), "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger", "false"], run=False)
    assert type(cli.model) is CausalLMModule
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, TokenSelection)] == [TokenSelection]


def test_a_rename_to_a_submodule_that_does_not_exist_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"renamed: lightning_tokens.sstoken has no submodule 'nowhere'"):
        alias("lightning_tokens._never_registered", "lightning_tokens.sstoken", renamed={"old": "nowhere"})
    assert "lightning_tokens._never_registered" not in sys.modules
