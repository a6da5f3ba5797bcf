"""The commands beside LightningCLI's own (lightning_tokens/cli/commands.py): bad values of ``score`` and
``collect-traces`` end in one line before a model is loaded, and the 0.1 import path of ``collect_main``."""

from __future__ import annotations

import json
import re

import pytest

from lightning_tokens.cli import EXTRA_COMMANDS, main
from tests.cli.options import ROOT

pytestmark = pytest.mark.usefixtures("in_a_scratch_folder")


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
    config = str(ROOT / "lightning_tokens/configs/sstoken/tiny.yaml")
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
