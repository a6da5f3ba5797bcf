"""benchmarks/gpu_suite.sh runs where no session can try it (a GPU): its command lines must at least parse, and the
CUDA checks it runs first (tests/gpu) must import and skip cleanly here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"

# Runs a benchmark module with parse_args stopped right after parsing: the arguments are checked, nothing runs.
PARSE_ONLY = """
import argparse, runpy, sys
def parse_only(self, args=None, namespace=None):
    parsed = argparse.ArgumentParser.__dict__['_original'](self, args, namespace)
    print('parsed', MODULE); sys.exit(0)
argparse.ArgumentParser._original = argparse.ArgumentParser.parse_args
argparse.ArgumentParser.parse_args = parse_only
MODULE, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(MODULE, run_name='__main__', alter_sys=True)
"""


def suite_commands() -> list[tuple[int, list[str]]]:
    commands = []
    for line in SUITE.read_text().splitlines():
        match = re.match(r'run (\d+)\s+"[^"]+" "\$PYTHON" (.+)$', line)
        if match:
            commands.append((int(match.group(1)), match.group(2).split()))
    return commands


def test_every_benchmark_of_the_gpu_suite_accepts_its_arguments_and_the_limits_fit_9_minutes():
    commands = suite_commands()
    # every `run` line was understood: the CUDA checks first, then eight benchmarks
    assert len(commands) == sum(line.startswith("run ") for line in SUITE.read_text().splitlines()) == 9
    assert commands[0][1][:3] == ["-m", "pytest", "tests/gpu"]
    assert sum(limit for limit, _ in commands) <= 9 * 60 - 20  # start-up and the CUDA device check fit in the rest
    for _, argv in commands[1:]:
        assert argv[0] == "-m" and argv[1].startswith("benchmarks."), argv  # benchmarks run as modules
        module = argv[1]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
        result = subprocess.run([sys.executable, "-c", PARSE_ONLY, *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0 and f"parsed {module}" in result.stdout, (argv, result.stderr[-2000:])


def test_the_cuda_checks_are_collected_and_skipped_without_cuda_saying_why():
    env = {key: value for key, value in os.environ.items() if key != "LT_GPU_TESTS_ON_CPU"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "tests/gpu"],
                            cwd=ROOT, capture_output=True, text=True, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    summary = result.stdout.strip().splitlines()[-1]
    defined = re.findall(r"^def test_", (ROOT / "tests/gpu/test_cuda_equality.py").read_text(), re.M)
    assert result.returncode == 0, result.stdout[-2000:]
    assert re.fullmatch(r"\d+ skipped(, \d+ warnings?)? in .*", summary), summary
    assert int(summary.split()[0]) >= len(defined) > 0  # every check (and its parameter cases) collected, none run
    assert "no CUDA device (LT_GPU_TESTS_ON_CPU=1 runs it on the CPU)" in result.stdout
