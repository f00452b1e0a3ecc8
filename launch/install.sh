#!/usr/bin/env bash
# Installs megatron-attnedit and what it needs into the current Python environment.
#   bash launch/install.sh [--test]
# torch: installs torch==2.13.0 only when no torch is importable; a torch already present
# (CUDA, ROCm or torch_npu build) is never replaced. Re-running is fast when all is in place.
# Env: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] no torch found: installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
if "$PY" -c "import megatron_attnedit, megatron.core, transformers, safetensors, sentencepiece, wandb, yaml, tqdm, psutil" >/dev/null 2>&1 \
   && { [ -z "$extras" ] || "$PY" -c "import pytest, matplotlib" >/dev/null 2>&1; } \
   && [ "$("$PY" -c 'import megatron_attnedit,os;print(os.path.dirname(os.path.dirname(megatron_attnedit.__file__)))')" = "$PWD" ]; then
  exit 0
fi
echo "[install] installing megatron-attnedit$extras (editable) and its dependencies"
"$PY" -m pip install -q -e ".$extras"
