"""Every numeric argument of the public API is checked where it is given: one ValueError naming ``Owner.field``.

The table below holds, for each int/float parameter of each class and function in ``lightning_tokens.__all__``,
values outside what it means; a test makes sure the table covers every such parameter, so a new argument
without a check fails here.
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_tokens
from lightning_tokens.cli import main

NAN, INF = float("nan"), float("inf")

#: Owner -> field -> values out of range (bools where an integer is meant, floats where an integer is meant,
#: NaN and infinity where a finite number is meant).
BAD_VALUES: dict[str, dict[str, list]] = {
    "BudgetForcing": {"budgets": [0, -5, NAN, []]},
    "BudgetGuidanceLogitsProcessor": {"budgets": [0, [16, -1]], "top_k": [0, 2.5, True], "min_rate": [NAN, "10", True],
                                      "min_shape": [INF, None], "min_mode": [NAN]},
    "BudgetPredictorModule": {"window": [-1, 2.5]},
    "CausalLMModule": {"max_new_tokens": [-1, 8.0, True], "generation_batches": [-1, 0.5]},
    "ConceptAwareFineTuning": {"num_heads": [0, 2.0], "beta": [-0.1, NAN], "gamma": [0.0, 1.5],
                               "sine_ratio": [0.0, 1.2], "chunk_size": [0, 64.0]},
    "ModelSpec": {"seed": [1.5, True, "0"]},
    "MultiTokenHeads": {"num_heads": [0, True]},
    "MultiTokenHeadsModule": {"num_heads": [0, -2], "gamma": [0.0, 1.01], "chunk_size": [0]},
    "OptimizerConfig": {"lr": [0.0, -1e-4, INF], "weight_decay": [-0.01],
                        "betas": [(0.9,), (0.9, 1.0), (-0.1, 0.9), 0.9], "warmup": [-1, NAN],
                        "min_lr_ratio": [-0.1, 1.5]},
    "PackedCollator": {"pad_token_id": [-1, None, 0.0], "pad_to_multiple_of": [0]},
    "PlainTextDataModule": {"max_documents": [0], "max_length": [1], "val_fraction": [1.0, -0.1], "batch_size": [0],
                            "eval_batch_size": [0], "seed": [0.5]},
    "PredictorConfig": {"hidden_size": [0, 8.0], "num_states": [0], "vocab_size": [-1], "d_model": [0], "depth": [0],
                        "heads": [0], "dropout": [1.0, -0.1]},
    "QuietSTaRModule": {"n_thoughts": [0], "thought_length": [0], "n_ahead_talk": [0], "base_loss_weight": [1.5],
                        "policy_weight": [-1.0], "reinforce_temperature": [0.0], "thought_temperature": [-0.5],
                        "embedding_scale": [0.0], "max_new_tokens": [-1], "generation_batches": [-1],
                        "difficult_fraction": [1.5], "think_at": [0, 1.5, "some", True]},
    "ReasoningTask": {"num_train": [-1], "num_val": [2.5], "seed": [1.5], "min_digits": [0], "max_digits": [0, 1.5],
                      "min_operands": [1], "max_operands": [1], "noise": [1.0], "noisy_fraction": [-0.1]},
    "SFTDataModule": {"max_length": [1], "val_fraction": [1.0], "seed": [True], "batch_size": [0, 1.5],
                      "eval_batch_size": [0], "num_workers": [-1], "pad_to_multiple_of": [0]},
    "TokenLossContext": {"chunk_size": [0]},
    "TokenSelection": {"ratio": [0.0, 1.5, True], "gamma": [-0.1], "warmup": [-1], "attention_layer": [1.5, True],
                       "ema_decay": [1.0], "seed": [0.5], "runaway_window": [0, 1.5], "runaway_rise": [0.0, -1]},
    "TraceDataModule": {"max_length": [1], "val_fraction": [-0.5], "batch_size": [0], "eval_batch_size": [0],
                        "seed": [0.5], "num_workers": [-1]},
    "collect_traces": {"max_new_tokens": [0], "batch_size": [0], "temperature": [0.0]},
    "estimate_thinking_length": {"top_k": [0]},
    "generate_with_heads": {"max_new_tokens": [0], "eos_token_id": [-1, [2, -1], 1.5], "num_draft": [0],
                            "pad_token_id": [-1]},
    "self_distill": {"max_new_tokens": [0], "batch_size": [0], "temperature": [0.0], "seed": [1.5]},
    "thoughtful_generate": {"max_new_tokens": [0], "thought_length": [0], "thought_temperature": [-1.0],
                            "temperature": [-1.0], "eos_token_id": [-1], "pad_token_id": [-1, None]},
}

#: Numeric parameters that have no range to check, and why.
EXEMPT = {("check_answer", "answer"): "the reference answer a completion is compared with: any integer or text"}

#: Other arguments each call needs; ``None`` stands for an object the check runs before reading.
REQUIRED: dict[str, dict] = {
    "BudgetForcing": {"tokenizer": None, "budgets": 16},
    "BudgetGuidanceLogitsProcessor": {"model": None, "predictor": None, "tokenizer": None, "budgets": 16},
    "MultiTokenHeads": {"model": None},
    "PackedCollator": {"pad_token_id": 0},
    "PredictorConfig": {"hidden_size": 32, "num_states": 3, "vocab_size": 50},
    "TokenLossContext": {"model": None, "input_ids": None, "attention_mask": None, "labels": None},
    "collect_traces": {"model": None, "tokenizer": None, "prompts": ["1 + 2 ="]},
    "estimate_thinking_length": {"model": None, "predictor": None, "input_ids": None},
    "generate_with_heads": {"model": None, "heads": None, "input_ids": torch.ones(1, 3, dtype=torch.long)},
    "self_distill": {"model": None, "tokenizer": None, "prompts": ["1 + 2 ="], "path": "never-written.jsonl"},
    "thoughtful_generate": {"model": None, "mixing_head": None, "start_embedding": None, "end_embedding": None,
                            "forbidden_ids": None, "input_ids": None},
}

CASES = [(owner, field, value) for owner, fields in BAD_VALUES.items() for field, values in fields.items()
         for value in values]


def numeric_parameters() -> set[tuple[str, str]]:
    """(owner, parameter) of every int- or float-typed (or -defaulted) parameter of the public API."""
    found = set()
    for name in lightning_tokens.__all__:
        obj = getattr(lightning_tokens, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        try:
            hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
        except NameError:  # an annotation naming a class imported only for type checking
            hints = {}
        for parameter in inspect.signature(obj).parameters.values():
            annotation = str(hints.get(parameter.name, parameter.annotation))
            default = parameter.default
            if re.search(r"\b(int|float)\b", annotation) or (type(default) in (int, float)):
                found.add((name, parameter.name))
    return found


def test_every_numeric_parameter_of_the_public_api_has_bad_values_here():
    covered = {(owner, field) for owner, fields in BAD_VALUES.items() for field in fields}
    found = numeric_parameters()
    assert found - covered - set(EXEMPT) == set(), "numeric parameters without a range check in BAD_VALUES"
    assert covered - found == set(), "BAD_VALUES names parameters the public API does not have"


@pytest.mark.parametrize(("owner", "field", "value"), CASES, ids=[f"{o}.{f}={v!r}" for o, f, v in CASES])
def test_an_out_of_range_value_raises_one_line_naming_the_field(owner, field, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(owner)}\.{field}\b") as error:
        getattr(lightning_tokens, owner)(**{**REQUIRED.get(owner, {}), field: value})
    assert "\n" not in str(error.value)


def test_values_on_the_edges_of_each_range_and_numpy_integers_are_accepted():
    selection = lightning_tokens.TokenSelection(ratio=1, gamma=0, warmup=0, attention_layer=np.int64(-2), ema_decay=0)
    assert (selection.ratio, selection.gamma, selection.attention_layer) == (1.0, 0.0, -2)
    optimizer = lightning_tokens.OptimizerConfig(lr=1e-9, weight_decay=0, betas=(0, 0.5), warmup=0, min_lr_ratio=1)
    assert optimizer.betas == (0, 0.5)
    task = lightning_tokens.ReasoningTask(num_train=0, num_val=0, seed=-3, noise=0.0, noisy_fraction=1)
    assert task.records("train") == []
    data = lightning_tokens.SFTDataModule(max_length=2, val_fraction=0, batch_size=np.int64(1), num_workers=0)
    assert (data.batch_size, data.eval_batch_size) == (1, 1)
    config = lightning_tokens.PredictorConfig(hidden_size=32, num_states=3, vocab_size=50, dropout=0)
    assert (config.dropout, config.depth) == (0, 2)
    assert lightning_tokens.PackedCollator(pad_token_id=0, pad_to_multiple_of=1).pad_token_id == 0


def test_the_cli_names_an_out_of_range_batch_size_in_one_line_with_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "lightning_tokens/configs/sft/tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.init_args.batch_size", "0", "--trainer.fast_dev_run", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        "lightning-tokens: error: SFTDataModule.batch_size must be an integer >= 1, got 0"]
