"""The console script as a user meets it: predict, test, --help, bad values and files, repeated runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_tokens.cli import EXTRA_COMMANDS, build_cli, main

ROOT = Path(__file__).resolve().parents[1]
SFT = str(ROOT / "configs/sft/tiny.yaml")
QUICK = ["--data.init_args.task.num_train", "32", "--data.init_args.task.num_val", "6",
         "--data.init_args.batch_size", "8", "--model.init_args.max_new_tokens", "4",
         "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs log to runs/ under the working directory


def console(*args, cwd):
    """``python -m lightning_tokens.cli ...`` in a fresh process, as the console script runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_tokens.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def fit(tmp_path, *extra):
    return build_cli(["fit", "--config", SFT, *QUICK, "--trainer.max_steps", "2", "--trainer.default_root_dir",
                      str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                      "--checkpoint.dirpath", str(tmp_path / "checkpoints"), *extra])


def test_an_ordinary_call_prints_no_warning_and_a_bad_value_one_line_with_status_2(tmp_path):
    ok = console("fit", "--config", SFT, *QUICK, "--trainer.fast_dev_run", "1", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert not [line for line in (ok.stderr + ok.stdout).splitlines() if "warn" in line.lower()], ok.stderr

    bad = console("fit", "--config", str(ROOT / "configs/sstoken/tiny.yaml"), "--trainer.callbacks.ratio", "1.5",
                  cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("lightning-tokens: error: TokenSelection.ratio must be in (0, 1], "
                                                   "got 1.5")


def test_help_lists_the_extra_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for command in ("fit", "validate", "test", "predict", *EXTRA_COMMANDS):
        assert command in shown, command
    assert "lightning-tokens score" in shown and "lightning-tokens collect-traces" in shown


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


def last_error_line(capsys, *argv):
    """``main(argv)``'s exit status and the last line it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_collect_traces_values_end_in_one_line_before_the_model_is_loaded(tmp_path, capsys):
    no_model = str(tmp_path / "no-model")  # never written: an error about it would mean the model was loaded first
    no_prompt = tmp_path / "prompts.jsonl"
    no_prompt.write_text("".join(json.dumps(row) + "\n" for row in ({"prompt": "Compute 1 + 1."}, {"text": "2 + 2"})))
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--batch-size", "0"], "collect-traces.batch_size must be an integer >= 1, got 0"),
        (["--max-new-tokens", "-1"], "collect-traces.max_new_tokens must be an integer >= 1, got -1"),
        (["--num", "0"], "collect-traces.num must be an integer >= 1 or None, got 0"),
        (["--sample", "--temperature", "0"], "collect-traces.temperature must be > 0, got 0.0"),
        (["--prompts", str(no_prompt)], f"{no_prompt}:2: missing field 'prompt'"),
        (["--prompts", str(tmp_path / "none.jsonl")], f"{tmp_path / 'none.jsonl'}: no such file"),
        (["--out", str(tmp_path / "a-file" / "t.jsonl")], f"--out: cannot write to {tmp_path / 'a-file'}"),
        ([], "--model: "),  # the checks passed, so the missing model is what fails
    ]
    for extra, message in cases:
        status, line = last_error_line(capsys, "collect-traces", "--model", no_model,
                                       "--out", str(tmp_path / "traces.jsonl"), *extra)
        assert status == 2, extra
        assert line.startswith(f"lightning-tokens: error: {message}"), (extra, line)
    assert not (tmp_path / "traces.jsonl").exists()


def test_bad_score_values_end_in_one_line(tmp_path, capsys):
    config = str(ROOT / "configs/sstoken/tiny.yaml")
    output = str(tmp_path / "history.pt")
    status, line = last_error_line(capsys, "score", "--config", config, "--output", output, "--batch_size", "0")
    assert (status, line) == (2, "lightning-tokens: error: score.batch_size must be an integer >= 1 or None, got 0")

    # A bad value in the YAML, found while the CLI builds the module and data (a traceback before).
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    batch_size: 0\n")
    status, line = last_error_line(capsys, "score", "--config", config, "--config", str(bad), "--output", output)
    assert status == 2
    assert re.fullmatch(r"lightning-tokens: error: \w+\.batch_size must be an integer >= 1, got 0", line), line
    assert not (tmp_path / "history.pt").exists()


def test_the_0_1_path_of_collect_main_gives_the_command():
    from lightning_tokens.budget import collect_main
    from lightning_tokens.cli.commands import collect_main as command

    assert collect_main is command is EXTRA_COMMANDS["collect-traces"]
