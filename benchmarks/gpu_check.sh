#!/usr/bin/env bash
# Times Shampoo and SOAP step() on one GPU against their bare linear algebra (and Meta's
# distributed_shampoo when importable). Repository code only; needs torch with CUDA, no network.
# Usage: bash benchmarks/gpu_check.sh [extra args for benchmarks.gpu_check]
# Output: bench_results/gpu_check/{gpu_check.json,table.md} (default sizes: the 1.3M MLP,
# then a 16-block-per-layer MLP). A few minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -m benchmarks.gpu_check --out bench_results/gpu_check/mlp1.3M "$@"
"$PYTHON" -m benchmarks.gpu_check --sizes 1024,4096,4096,1024 --batch 8192 --periods 2 \
    --out bench_results/gpu_check/mlp4096 "$@"
