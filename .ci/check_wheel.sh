#!/usr/bin/env bash
# What a `pip install lightning-tokens` user gets: build the sdist and the wheel, check them, install the wheel into
# a new venv in a temporary folder outside the checkout (the pinned versions, as constraints), and there run the
# console script, the config listing and a few steps of the tiny SFT config by name.
#   bash .ci/check_wheel.sh [PYTHON]     PYTHON: the interpreter that builds (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m build --sdist --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$python" -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
"$python" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["lightning_tokens/configs/sft/tiny.yaml", "lightning_tokens/configs/caft/heads-tiny.yaml", "lightning_tokens/py.typed"]
missing = [n for n in need if n not in names]
missing += [] if any(n.endswith("licenses/LICENSE") for n in names) else ["LICENSE"]
missing += [] if any(n.startswith("lightning_tokens/data/") and n.endswith(".json") for n in names) else ["tokenizer"]
stray = [n for n in names if n.startswith(("tests/", "experiments/", "benchmarks/"))]
assert not missing and not stray, f"wheel: missing {missing}, stray {stray}"
print(f"wheel: {len(names)} files, configs, LICENSE and tokenizer included")
PY

# jsonargparse[signatures]==X is an extra, which a constraints file may not name.
sed -E 's/\[[a-z,]+\]//' requirements-ci.txt > "$work/constraints.txt"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c "$work/constraints.txt" "$wheel"
cd "$work"
mkdir run && cd run
export PATH="$work/venv/bin:$PATH" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
lightning-tokens --help > /dev/null
lightning-tokens configs | tee configs.txt
grep -q "^sft/tiny " configs.txt
lightning-tokens fit --config sft/tiny --trainer.max_steps 5 --trainer.limit_val_batches 0 \
  --trainer.enable_progress_bar false --data.init_args.task.num_train 64 --data.init_args.task.num_val 8
test -f runs/sft-tiny/checkpoints/last.ckpt
python -c "import lightning_tokens, sys; assert lightning_tokens.__version__ != '0+unknown'; print('installed', lightning_tokens.__version__)"
echo "check_wheel: the wheel installs and runs outside the checkout"
