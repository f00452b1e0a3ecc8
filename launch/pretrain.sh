#!/usr/bin/env bash
# Train a model with the plain next-token objective (lm): the bundled tiny teacher from scratch,
# continued pretraining from a Hugging Face checkpoint, or the plain-CE baseline of a student.
#
#   bash launch/pretrain.sh RECIPE [--set section.key=value ...]
#
# RECIPE: a file, or a name in launch/recipes/ (e.g. tiny_lm). Same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash launch/pretrain.sh R
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash launch/pretrain.sh R
# Ascend: PLATFORM=npu (HCCL, ASCEND_RT_VISIBLE_DEVICES). All variables: launch/common.sh.
# A rerun resumes from the latest checkpoint of the run directory.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
RECIPE=$1
shift
source "$(dirname "$0")/common.sh"
run_torchrun --recipe "$RECIPE" --set objective.name=lm "$@"
