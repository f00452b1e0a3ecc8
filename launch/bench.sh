#!/usr/bin/env bash
# Distillation throughput at a real model shape (random weights), against its references: the plain
# CE step of the same student and the teacher's forward alone, same data and layout, same run of this
# script. Prints one JSON object per target: tokens/s, step time, per-GPU model TFLOP/s, MFU, peak
# memory of each run, the device, and the step-time ratios stage2/lm and stage1/teacher_fwd.
# Fields and FLOP counting: launch/bench.py.
#
#   bash launch/bench.sh [--set KEY=VALUE ...] [--set-stage2 KEY=VALUE ...] [other launch/bench.py args]
#
# Env (default):
#   PRESET    qwen3-8b | qwen3-30b-a3b | qwen3-debug | qwen3-moe-debug    (qwen3-8b)
#   LAYERS    decoder layers kept of the preset (8)
#   TARGET    mla | gate_swa | mla,gate_swa (mla)
#   CONFIGS   runs, any of lm,teacher_fwd,stage1,stage2 (all four)
#   SEQ (4096)  GBS global batch (4)  MBS micro batch (1)  ITERS steps per run (8; median of steps 3..)
#   NPROC     processes = GPUs (1); > 1 runs each config under torchrun (data parallel)
#   TP (1)  EP (1)   tensor / expert parallel sizes
#   PLATFORM  auto | cuda | npu | cpu (auto)       WORK  scratch directory (/tmp/attnedit_bench)
# Examples:
#   bash launch/bench.sh                                          # Qwen3-8B shape, 8 layers, MLA, 1 GPU
#   PRESET=qwen3-30b-a3b LAYERS=4 NPROC=2 EP=2 bash launch/bench.sh   # MoE, experts split over 2 GPUs
#   CONFIGS=lm,stage2 bash launch/bench.sh --set-stage2 objective.options.loss_chunk_tokens=0
#   PRESET=qwen3-debug PLATFORM=cpu LAYERS=2 SEQ=64 GBS=2 ITERS=4 bash launch/bench.sh   # CPU smoke run
# --set applies to every run; --set-lm / --set-teacher_fwd / --set-stage1 / --set-stage2 to one.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
source "$(dirname "$0")/common.sh"   # PLATFORM detection, PYTHONPATH, CUDA/NCCL/OMP environment
exec "$PY" "$ROOT/launch/bench.py" --preset "${PRESET:-qwen3-8b}" --layers "${LAYERS:-8}" --target "${TARGET:-mla}" \
  --configs "${CONFIGS:-lm,teacher_fwd,stage1,stage2}" --seq "${SEQ:-4096}" --gbs "${GBS:-4}" --mbs "${MBS:-1}" \
  --iters "${ITERS:-8}" --nproc "${NPROC:-1}" --tp "${TP:-1}" --ep "${EP:-1}" --platform "$PLATFORM" \
  --work "${WORK:-/tmp/attnedit_bench}" "$@"
