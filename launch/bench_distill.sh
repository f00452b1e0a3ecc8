#!/usr/bin/env bash
# Distillation throughput on one GPU at Qwen3-8B shape (random weights); prints JSON.
#   bash launch/bench_distill.sh [extra args of launch/bench_distill.py]
# Env: LAYERS (8), TARGET (mla | gate_swa), SEQ (4096), GBS (4), ITERS (8), PRESET (qwen3-8b)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0
exec python3 launch/bench_distill.py --preset "${PRESET:-qwen3-8b}" --layers "${LAYERS:-8}" --target "${TARGET:-mla}" \
  --seq "${SEQ:-4096}" --gbs "${GBS:-4}" --iters "${ITERS:-8}" "$@"
