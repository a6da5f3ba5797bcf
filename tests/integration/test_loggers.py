"""Each method's metrics reach every logger under the same names: a TensorBoardLogger and a CSVLogger in the same
run (built in Python, and given to the CLI with ``--trainer.logger``) hold the same tags, steps and values, and the
tags each method documents are among them."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from lightning_tokens.budget import BudgetPredictorModule, TraceDataModule
from lightning_tokens.caft import ConceptAwareFineTuning, MultiTokenHeadsModule
from lightning_tokens.cli import build_cli
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.quiet_star import QuietSTaRModule
from lightning_tokens.sft import CausalLMModule
from lightning_tokens.sstoken import TokenSelection
from tests.tiny import tiny_config

SCHEME = re.compile(r"(train|val|test|selection)/\w+")  # plus Lightning's own "epoch"


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``log_dir``: its ``(step, value)`` points in logging order."""
    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    scalars.pop("hp_metric", None)  # TensorBoardLogger's own placeholder, written with the hyperparameters
    return scalars


def csv_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every column of ``log_dir/metrics.csv`` but ``step``: its ``(step, value)`` points in row order."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    with open(log_dir / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            step = int(row.pop("step"))
            for name, value in row.items():
                if value != "":
                    scalars.setdefault(name, []).append((step, float(value)))
    return scalars


def assert_same_metrics(tensorboard: Path, csv_dir: Path, expected: set[str]) -> dict[str, list]:
    """Both loggers hold the same tags with the same points; ``expected`` is among them and every name fits the
    scheme. Returns the TensorBoard scalars."""
    board, table = tensorboard_scalars(tensorboard), csv_scalars(csv_dir)
    assert set(board) == set(table)
    assert expected <= set(board), sorted(expected - set(board))
    assert all(SCHEME.fullmatch(name) for name in set(board) - {"epoch"}), sorted(board)
    for name, points in board.items():
        assert [step for step, _ in points] == [step for step, _ in table[name]], name
        for (_, value), (_, written) in zip(points, table[name]):
            assert math.isclose(value, written, rel_tol=1e-6, abs_tol=1e-9), (name, value, written)  # float32 in TB
    return board


def run(tmp_path: Path, module, data, *, test: bool = False, **kwargs) -> tuple[Path, Path]:
    """Fit ``module`` for 2 steps (validating at the end) with both loggers; with ``test``, test it too.
    Returns the TensorBoard and CSV folders."""
    board = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    table = CSVLogger(tmp_path, name="csv")
    options = dict(accelerator="cpu", devices=1, max_steps=2, log_every_n_steps=1, limit_val_batches=1,
                   val_check_interval=2, num_sanity_val_steps=0, limit_test_batches=1, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer = Trainer(logger=[board, table], **{**options, **kwargs})
    trainer.fit(module, datamodule=data)
    if test:
        trainer.test(module, datamodule=data, verbose=False)
    return Path(board.log_dir), Path(table.log_dir)


def sft_data() -> SFTDataModule:
    return SFTDataModule(task=ReasoningTask(num_train=8, num_val=4), batch_size=4, max_length=48)


def tiny_spec() -> ModelSpec:
    return ModelSpec(config=tiny_config("llama"))


OPTIMIZER = OptimizerConfig(lr=1e-2, warmup=0)
HEADS = {f"{stage}/head{k}_{what}" for stage in ("train", "val") for k in (1, 2) for what in ("loss", "acc")}
QUIET_STAR_PARTS = {"base_nll", "mixed_nll", "mixing_weight", "reward", "difficult_base_nll", "difficult_mixed_nll"}


def test_causal_lm_module_logs_the_same_to_tensorboard_and_csv(tmp_path):
    module = CausalLMModule(tiny_spec(), optimizer=OPTIMIZER, max_new_tokens=3)
    board = assert_same_metrics(*run(tmp_path, module, sft_data(), test=True), {
        "train/loss", "train/ppl", "train/tokens_per_sec", "val/loss", "val/ppl", "val/exact_match",
        "test/loss", "test/ppl", "test/exact_match"})
    assert len(board["train/loss"]) == 2  # every step, with log_every_n_steps=1


@pytest.mark.parametrize("mode, expected", [
    ("sstoken", {"loss_current", "loss_history", "rel", "attention", "rank_corr", "gamma", "kept_fraction"}),
    ("rho1", {"loss_current", "loss_history", "kept_fraction"}),
])
def test_token_selection_logs_its_selection_metrics(tmp_path, mode, expected):
    module = CausalLMModule(tiny_spec(), optimizer=OPTIMIZER, max_new_tokens=0)
    options = {"reference": tiny_spec()} if mode == "rho1" else {"warmup": 0}
    callback = TokenSelection(ratio=0.6, mode=mode, **options)
    board = assert_same_metrics(*run(tmp_path, module, sft_data(), callbacks=[callback], limit_val_batches=0),
                                {f"selection/{name}" for name in expected} | {"train/loss"})
    assert [step for step, _ in board["selection/kept_fraction"]] == [0, 1]


def test_concept_aware_fine_tuning_logs_its_auxiliary_terms(tmp_path):
    module = CausalLMModule(tiny_spec(), optimizer=OPTIMIZER, max_new_tokens=0)
    callback = ConceptAwareFineTuning(heads_path=str(tmp_path / "no-heads"), num_heads=2, require_heads=False)
    expected = {"train/caft_loss", "train/caft_schedule"} | {
        f"train/caft_head{k}_{what}" for k in (1, 2) for what in ("loss", "acc")}
    with pytest.warns(UserWarning):  # no stage-1 heads yet: fresh ones
        paths = run(tmp_path, module, sft_data(), callbacks=[callback], limit_val_batches=0)
    assert_same_metrics(*paths, expected | {"train/loss"})


def test_multi_token_heads_module_logs_each_head(tmp_path):
    module = MultiTokenHeadsModule(tiny_spec(), num_heads=2, optimizer=OPTIMIZER, heads_path=str(tmp_path / "heads"))
    assert_same_metrics(*run(tmp_path, module, sft_data()), HEADS | {"train/loss", "val/loss"})


def test_quiet_star_module_logs_its_parts_and_tests_under_test(tmp_path):
    module = QuietSTaRModule(tiny_spec(), optimizer=OPTIMIZER, n_thoughts=2, thought_length=2, n_ahead_talk=2,
                             max_new_tokens=3)
    parts = QUIET_STAR_PARTS | {"loss", "exact_match"}
    expected = ({f"train/{name}" for name in QUIET_STAR_PARTS | {"loss", "nll", "policy_loss"}}
                | {f"{stage}/{name}" for stage in ("val", "test") for name in parts})
    board = assert_same_metrics(*run(tmp_path, module, sft_data(), test=True), expected)
    assert len(board["val/loss"]) == len(board["test/loss"]) == 1  # test logs under test/, not again under val/


def test_budget_predictor_module_logs_its_length_metrics(tmp_path):
    module = BudgetPredictorModule(tiny_spec())
    data = TraceDataModule(task=ReasoningTask(num_train=24, num_val=8, style="mixed"), max_length=64, batch_size=4)
    assert_same_metrics(*run(tmp_path, module, data), {
        "train/loss", "val/loss", "val/abs_error", "val/within_window", "val/window_prob"})


def test_the_cli_logs_to_tensorboard_given_with_trainer_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config writes its checkpoints under runs/
    build_cli(["fit", "--config", "sstoken/tiny", "--data.init_args.task.num_train", "16",
               "--data.init_args.task.num_val", "4", "--data.init_args.batch_size", "8",
               "--model.init_args.max_new_tokens", "2", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
               "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir", "tb",
               "--trainer.logger+=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "csv"])
    # The logger replacing the config's keeps the init_args they share (name); the appended one has its defaults.
    board, table = Path("tb/sstoken-tiny/version_0"), Path("csv/lightning_logs/version_0")
    assert_same_metrics(board, table, {"train/loss", "val/loss", "val/exact_match", "selection/kept_fraction",
                                       "selection/rel", "selection/attention"})
