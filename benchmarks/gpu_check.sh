#!/usr/bin/env bash
# The ten-minute check on one CUDA GPU, offline (benchmarks/gpu_check.py; benchmarks/README.md says what it measures):
#
#   bash benchmarks/gpu_check.sh --output outputs/gpu_check.json
#   bash benchmarks/gpu_check.sh --cpu --tiny --output outputs/gpu_check_cpu.json   # ~1 min smoke run, tested
#
# Every argument goes to gpu_check.py. Nothing is downloaded: the models are built locally and loaded from disk.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One GPU: on a machine with several, Trainer would spread the model over all of them (DataParallel).
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
output=outputs/gpu_check.json
previous=""
for arg in "$@"; do
    if [[ "$previous" == "--output" ]]; then output="$arg"; fi
    if [[ "$arg" == --output=* ]]; then output="${arg#--output=}"; fi
    previous="$arg"
done
python benchmarks/gpu_check.py "$@"
echo "gpu_check: results in $output (models and trainer logs in ${output%.json}_work/)"
