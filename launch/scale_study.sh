#!/usr/bin/env bash
# The scale study (issue 17): a Qwen3 teacher of 81.8M parameters trained here at sequence length
# 4096 on the Python sources of the installed packages, converted to MLA (KV 26.6% of the
# teacher's) and GateSWA (W=512, 2 full layers of 12: KV 27.1% at 4K tokens) and to MLA without
# stage 1, all evaluated at 4096-token windows -- one command on one GPU, planned at ~7.5 minutes
# on an H100 (the estimate is printed first; see megatron_attnedit/scale_study/plan.py).
#
#   bash launch/scale_study.sh [--out runs/scale_study] [--tiny] [--jobs N] [--budget-s S] [--dry-run]
#                              [--teacher-iters N] [--stage1-iters N] [--stage2-iters N]
#                              [--reuse-teacher] [--summary-only] [--recall-share F] [--set section.key=value ...]
#                              [--set-mla section.key=value ...] [--set-gateswa section.key=value ...]
#
# --out       everything goes here (default runs/scale_study): corpus/, datasets/, teacher/, hf/,
#             mla/, gateswa/ (training runs), report/ (evaluate), logs/, phases.json, and at the end
#             study.json (raw), study.md (the table), study_curves.png
# --tiny      the same phases at toy size on the CPU in a few minutes (tests/test_scale_study.py)
# --jobs      conversion chains run at once on the one GPU (default 3: their start-ups overlap)
# --budget-s  wall-time budget (default 540 on a GPU): stage steps are scaled down after the teacher
#             if its measured speed says the planned ones would not fit (recorded in study.json)
# --dry-run   print sizes, steps and the per-phase estimate; run nothing
# --teacher-iters / --stage1-iters / --stage2-iters   steps instead of the recipes' (the split between stages)
# --recall-share    share of training files with recall drills (default 0.5; 0: the files as written)
# --set-mla / --set-gateswa   overrides for one target's runs (e.g. --set-gateswa target.options.window=1024)
# --reuse-teacher   keep --out's corpus, datasets and teacher; rerun conversions + evaluation (~4 min on a GPU)
# --summary-only    rewrite study.json / study.md / study_curves.png from --out's finished files
# Recipes: launch/recipes/study_teacher.yaml, study_mla.yaml, study_gateswa.yaml.
# Needs megatron-core importable (e.g. PYTHONPATH=/path/to/megatron-core); no network.
# Env: PYTHON (default: the one launch/install.sh installs into, launch/python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
source launch/python.sh
exec "$(attnedit_python)" -m megatron_attnedit.scale_study "$@"
