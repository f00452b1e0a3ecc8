#!/usr/bin/env bash
# The test command (CI: .ci/run): installs what is needed, then runs the CPU test suite.
#   bash tests/run_tests.sh [pytest args]
#
# Runs on the Python that launch/python.sh chooses and launch/install.sh installs into: the primary
# stack (megatron-core 0.19.2 on Python >= 3.12; the project venv .venv when python3 is older), or
# the fallback stack (megatron-core 0.16.1 on python3) when no Python >= 3.12 is on the machine.
#   no args:      the whole suite there; then, when that was the primary stack and a Python 3.11 is
#                 on the machine, a smoke subset (SMOKE below) on the fallback stack, in its own venv
#                 .venv-py311 (--system-site-packages: what that Python has at the pins is used as
#                 it is; the rest is installed into the venv, never into that Python)
#   pytest args:  those, on the chosen Python only
# Exit status: non-zero when either run failed. Multi-process tests start 2 gloo processes on
# 127.0.0.1 through torchrun.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/python.sh
bash launch/install.sh --test || exit 1
echo "[tests] installed in $SECONDS s"
PY=$(attnedit_python)
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

# The fallback stack's smoke subset: the pins and the fixes' version ranges of that stack, teacher
# parity against transformers at TP/PP/EP 1 and 2, one conversion round trip, a short training run,
# and the MLA / GateSWA exports (about 5 minutes on 2 cores).
SMOKE=(tests/test_dependencies.py tests/test_fixes.py tests/test_parity.py
       tests/test_convert.py::test_round_trip_torch_dist_direct tests/test_training.py::test_lm_loss_goes_down
       tests/test_export.py)

stack() {  # "megatron-core X on Python Y (interpreter)"
  "$1" - "$1" <<'PY'
import sys
from importlib.metadata import version
print("megatron-core %s on Python %s (%s)" % (version("megatron-core"), sys.version.split()[0], sys.argv[1]))
PY
}

run_pytest() {  # PYTHON PYTEST-ARGS...: pytest's exit status; 5 (no test collected, e.g. a -k filter that matches nothing) counts as 0
  local py=$1
  shift
  echo "[tests] $(stack "$py")"
  # PYTHON: the launch scripts that tests start (pretrain.sh, bench.sh, ...) run on this interpreter too
  PYTHON=$py "$py" -m pytest -q -p no:cacheprovider --durations=15 "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi
  return "$rc"
}

if [ $# -gt 0 ]; then
  run_pytest "$PY" "$@"
  exit $?
fi
started=$SECONDS
run_pytest "$PY" tests
rc=$?
echo "[tests] whole suite: exit $rc in $((SECONDS - started)) s"

if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  if py311=$(attnedit_find_python 3.11); then
    echo "[tests] the fallback stack's smoke subset, in .venv-py311 (made with $py311)"
    smoke_rc=1
    started=$SECONDS
    if "$py311" -m venv --system-site-packages .venv-py311 && PYTHON=.venv-py311/bin/python bash launch/install.sh --test; then
      run_pytest .venv-py311/bin/python "${SMOKE[@]}"
      smoke_rc=$?
    fi
    echo "[tests] smoke subset on the fallback stack: exit $smoke_rc in $((SECONDS - started)) s (install included)"
    [ "$smoke_rc" -ne 0 ] && rc=$smoke_rc
  else
    echo "[tests] no Python 3.11 on this machine: the fallback stack's smoke subset was not run"
  fi
fi
exit "$rc"
