#!/usr/bin/env bash
# Progressive distillation of a recipe's student from its teacher, one stage per call.
#
#   bash launch/distill.sh STAGE RECIPE [--set section.key=value ...]
#
# STAGE: 1 (layer-wise, teacher-forced attention MSE) or 2 (end-to-end KL); also stage1 / stage2.
# RECIPE: a file, or a name in launch/recipes/ (e.g. qwen3_8b_mla); its stages.stageN section
# applies. Stage 2 starts from stage 1's checkpoints (checkpoint.pretrained_checkpoint in the recipe).
# Same command on every node:
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash launch/distill.sh 1 qwen3_8b_mla
# Ascend: PLATFORM=npu (HCCL, ASCEND_RT_VISIBLE_DEVICES). All variables: launch/common.sh.
# A rerun resumes from the latest checkpoint of the stage's run directory.
set -euo pipefail
if [ $# -lt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
case "$1" in
  1|stage1) STAGE=stage1 ;;
  2|stage2) STAGE=stage2 ;;
  *) echo "error: STAGE must be 1 or 2 (got '$1')" >&2; exit 2 ;;
esac
RECIPE=$2
shift 2
source "$(dirname "$0")/common.sh"
run_torchrun --recipe "$RECIPE" --stage "$STAGE" "$@"
