#!/usr/bin/env bash
# The main job: installs what is missing, then runs the whole pipeline on the bundled tiny Qwen3
# teacher, on the CPU, for MLA and for GateSWA:
#   stdlib datasets (teacher tokenizer) -> stage 1 -> stage 2 -> export to HF -> evaluation report
# and prints the report path and a summary (teacher / student perplexity, KV reduction, time).
#
#   bash launch/quickstart.sh [--run-dir runs/quickstart] [--quick] [--skip-stage1] [--ablation mla,gateswa|none]
#                             [--targets mla,gateswa] [--nproc N] [--teacher dense|moe|HF_DIR]
#                             [--stage1-iters N] [--stage2-iters N] [--set section.key=value ...]
#
# --run-dir       everything goes here (default runs/quickstart): data/, <target>/stage1|stage2[_no_stage1]/
#                 (training runs), hf/<student>/ (exports), report/ (report.md, results.json, plots), logs/, summary.json
# --quick         short-step variant for CI (a few steps per stage, fewer held-out tokens, no ablation)
# --skip-stage1   ablation: stage 2 straight from the initialised student, for every target
# --ablation      targets that also get a no-stage-1 student next to the full one (default: mla)
# --nproc         training processes, data-parallel over gloo (default min(2, cores))
# Recipes: launch/recipes/quickstart_mla.yaml, quickstart_gateswa.yaml. Steps are logged to RUN/logs/.
# Env: PYTHON (default: the one launch/install.sh installs into, launch/python.sh), WANDB_MODE (default disabled here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
bash launch/install.sh
source launch/python.sh
PY=$(attnedit_python)
# The report's PNG plots need matplotlib (the [report] extra); install.sh installs the core only.
if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
  echo "[install] installing the report extra (matplotlib)"
  "$PY" -m pip install -q -e ".[report]"
fi
exec "$PY" -m megatron_attnedit.quickstart "$@"
