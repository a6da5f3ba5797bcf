"""Runs of the LightningCLI (lightning_tokens/cli/lightning_cli.py) into folders: test and predict after a fit, a
second fit replacing last.ckpt, and bad checkpoints or folders named before training."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lightning_tokens.cli import build_cli, main
from tests.cli.options import QUICK, SFT

pytestmark = pytest.mark.usefixtures("in_a_scratch_folder")


def fit(tmp_path, *extra):
    return build_cli(["fit", "--config", SFT, *QUICK, "--trainer.max_steps", "2", "--trainer.default_root_dir",
                      str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                      "--checkpoint.dirpath", str(tmp_path / "checkpoints"), *extra])


def test_test_logs_under_test(tmp_path):
    fit(tmp_path)
    cli = build_cli(["test", "--config", SFT, *QUICK, "--ckpt_path", str(tmp_path / "checkpoints/last.ckpt"),
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    logged = set(cli.trainer.callback_metrics)
    assert {"test/loss", "test/ppl", "test/exact_match"} <= logged
    assert not [name for name in logged if name.startswith("val/")]


def test_predict_writes_a_jsonl_of_held_out_prompts_or_of_a_prompts_file(tmp_path):
    fit(tmp_path)
    common = ["--config", SFT, *QUICK, "--ckpt_path", str(tmp_path / "checkpoints/last.ckpt"),
              "--trainer.default_root_dir", str(tmp_path / "out")]
    build_cli(["predict", *common])
    rows = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # the held-out problems
    for row in rows:
        assert set(row) == {"prompt", "completion", "answer", "reference", "correct"}
        assert row["prompt"].startswith("Compute") and isinstance(row["correct"], bool)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Compute 2 + 2.", "answer": "4"}) + "\n"
                       + json.dumps({"prompt": "Compute 7 - 3."}) + "\n")
    build_cli(["predict", *common, "--data.init_args.predict_file", str(prompts)])
    rows = [json.loads(line) for line in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Compute 2 + 2.", "Compute 7 - 3."]
    assert rows[0]["reference"] == "4" and "correct" in rows[0] and "reference" not in rows[1]


def test_a_second_fit_into_the_same_folder_replaces_last_ckpt(tmp_path):
    fit(tmp_path)
    fit(tmp_path, "--trainer.max_steps", "3")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_empty_corrupt_or_missing_checkpoints_and_unwritable_folders_are_named_before_training(tmp_path, capsys):
    empty, corrupt = tmp_path / "empty.ckpt", tmp_path / "corrupt.ckpt"
    empty.write_bytes(b"")
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--ckpt_path", str(empty)], "ckpt_path: .*empty.ckpt is empty"),
        (["--ckpt_path", str(corrupt)], "ckpt_path: .*corrupt.ckpt is not a PyTorch checkpoint"),
        (["--ckpt_path", str(tmp_path / "nope.ckpt")], "ckpt_path: .*nope.ckpt: no such file"),
        (["--checkpoint.dirpath", str(tmp_path / "a-file" / "sub")],
         "checkpoint.dirpath: cannot write to .*a-file/sub"),
        (["--checkpoint.dirpath", str(tmp_path / "killed"), "--ckpt_path", "last"],
         "ckpt_path: .*killed/last.ckpt is empty"),
    ]
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "last.ckpt").write_bytes(b"")
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", SFT, *QUICK, "--trainer.max_steps", "1",
                  "--trainer.default_root_dir", str(tmp_path / "run"), *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.match(f"lightning-tokens: error: {message}", err), err
    assert not (tmp_path / "run" / "checkpoints").exists()  # no run started
