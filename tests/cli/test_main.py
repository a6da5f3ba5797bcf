"""The console script's entry point (lightning_tokens/cli/main.py) as a user meets it: no warning on an ordinary
call, one error line and exit status 2 for a bad value, and --help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightning_tokens.cli import EXTRA_COMMANDS, main
from tests.cli.options import QUICK, SFT

pytestmark = pytest.mark.usefixtures("in_a_scratch_folder")


def console(*args, cwd):
    """``python -m lightning_tokens.cli ...`` in a fresh process, as the console script runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_tokens.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_an_ordinary_call_prints_no_warning_and_a_bad_value_one_line_with_status_2(tmp_path):
    ok = console("fit", "--config", SFT, *QUICK, "--trainer.fast_dev_run", "1", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert not [line for line in (ok.stderr + ok.stdout).splitlines() if "warn" in line.lower()], ok.stderr

    bad = console("fit", "--config", "sstoken/tiny", "--trainer.callbacks.ratio", "1.5",
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
