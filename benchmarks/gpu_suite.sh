#!/usr/bin/env bash
# Every GPU figure benchmarks/README.md still lacks, in one command on one GPU, in under 9 minutes.
#
#     bash benchmarks/gpu_suite.sh            # from the repository root, with the package installed
#
# Each benchmark runs as a module (python -m benchmarks.<name>) from the repository root.
#
# First the CUDA equality checks (tests/gpu: the lean loss, QLoRA, packing, Quiet-STaR and speculative decoding
# against their references on the device), then the benchmarks. Each step runs under its own time limit (the
# sum is 8.7 minutes), builds its models from configs (nothing is downloaded) and a benchmark prints its own
# ratios against the plain baseline of the same run. A step that fails or runs out of time is reported and the
# suite goes on; the exit status is 1 if any did, failed checks included.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
unset LT_GPU_TESTS_ON_CPU  # the checks run on the GPU here, never on the CPU
failed=()

run() {  # run SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout --signal=INT "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - started))s"
    [ "$status" -eq 0 ] || failed+=("$name")
}

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1

run 60  "CUDA equality checks (tests/gpu)" "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider
run 50  "loss memory (lean per-token loss)" "$PYTHON" -m benchmarks.lean_loss_memory --device cuda --dtype bfloat16 --steps 5
run 95  "QLoRA config memory and tokens/s" "$PYTHON" -m benchmarks.qlora_speed --steps 15 --warmup 3
run 90  "ssToken history options (base, precomputed, ...)" "$PYTHON" -m benchmarks.sstoken_speed --size 1.5b --batch 4 --length 1024 --steps 5
run 40  "CAFT heads memory" "$PYTHON" -m benchmarks.caft_memory --device cuda --repeats 3
run 65  "Quiet-STaR step and generation" "$PYTHON" -m benchmarks.quiet_star_speed --device cuda --hidden 1024 --layers 8 --batch 8 --length 256 --prompt 64 --new-tokens 32 --repeats 3
run 40  "Quiet-STaR thoughtful generation: slot cache vs plain and naive re-run" "$PYTHON" -m benchmarks.quiet_star_generate_speed --device cuda --hidden 1024 --layers 4 --batch 8 --new-tokens 16 --naive-tokens 4 --compile 256
run 55  "budget guidance overhead" "$PYTHON" -m benchmarks.budget_speed --qwen-shaped --new-tokens 128 --repeats 3
run 25  "packing: real tokens/s packed vs padded" "$PYTHON" -m benchmarks.packing_speed --device cuda --dtype bfloat16 --hidden 1024 --layers 8 --steps 8

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_suite: every check passed and every benchmark finished"
else
    echo "gpu_suite: failed or timed out: ${failed[*]}"
    exit 1
fi
