#!/usr/bin/env bash
# The test command: installs what is needed, then runs the CPU test suite.
#   bash tests/run_tests.sh [pytest args]
# Multi-process tests start 2 gloo processes on 127.0.0.1 through torchrun.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh --test || exit 1
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python3 -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
rc=$?
# pytest exits 5 when it collected no test (e.g. a -k filter that matches nothing).
if [ "$rc" -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi
exit "$rc"
