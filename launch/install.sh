#!/usr/bin/env bash
# Installs megatron-attnedit and what it needs into the Python that launch/python.sh chooses:
# $PYTHON if set; else python3 if it is >= 3.12; else the project venv .venv, made with a Python
# 3.12 / 3.13 found on this machine (one line says so); else python3 as it is (Python 3.11: the
# fallback stack, megatron-core 0.16.1; one line says so and how to get the primary one).
#   bash launch/install.sh [--test]     (--test: the test extras, including llama-cpp-python built from source, CPU)
# Pins: requirements*.txt, per Python (megatron-core 0.19.2 on >= 3.12, 0.16.1 below).
# torch: installs torch==2.13.0 only when no torch is importable; a torch already present
# (CUDA, ROCm or torch_npu build) is never replaced. Re-running is fast when all is in place.
# Env: PYTHON (an interpreter to install into, used as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python.sh
PY=$(attnedit_python --create)
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] no torch found: installing torch==2.13.0"
  # On Python 3.12+ PyPI's torch is the CUDA build: about 5 GB installed (84 s on the CI machine).
  started=$SECONDS
  "$PY" -m pip install -q "torch==2.13.0"
  echo "[install] torch $("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null) installed in $((SECONDS - started)) s"
fi
# Fast path: the project is installed from this checkout and every pinned dependency of this
# Python is installed at its pinned version (requirements*.txt); anything else reinstalls, so a
# user gets what CI ran. Checked from outside the checkout, so that what is seen is what is
# installed (not the package directory and the egg-info a build leaves in the checkout).
pins="$PWD/requirements.txt"
[ -n "$extras" ] && pins="$pins $PWD/requirements-test.txt"
ROOT=$PWD
PY_ABS=$("$PY" -c "import sys; print(sys.executable)")
if (cd / && "$PY_ABS" - "$ROOT" $pins >/dev/null 2>&1) <<'PY'
import os, sys
from importlib.metadata import distribution, requires, version
from packaging.requirements import Requirement
import megatron_attnedit
assert os.path.dirname(os.path.dirname(os.path.realpath(megatron_attnedit.__file__))) == os.path.realpath(sys.argv[1])
declared = [Requirement(r) for r in requires("megatron-attnedit") or []]
assert any(e.name == "attnedit" for e in distribution("megatron-attnedit").entry_points)  # the console command (setup.py)
for path in sys.argv[2:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():  # the pins of this Python
                pinned = str(req.specifier).removeprefix("==")
                assert version(req.name) == pinned, (req.name, version(req.name), pinned)
                # the installed package declares the same pin for this Python (the test pins as its [test] extra)
                assert any((d.name, d.specifier) == (req.name, req.specifier) and (d.marker is None or d.marker.evaluate({"extra": "test"}))
                           for d in declared), req
PY
then
  exit 0
fi
echo "[install] installing megatron-attnedit$extras (editable) and its pinned dependencies"
if [ -n "$extras" ] && ! "$PY" -c "from importlib.metadata import version; assert version('llama-cpp-python') == '0.3.36'" >/dev/null 2>&1; then
  # The tests' llama.cpp (llama-cpp-python, from source; pip caches the wheel): a CPU build of only
  # what the bindings load -- libllama and libggml: no multimodal library (LLAVA_BUILD), no "common"
  # utilities (launch/llama_cpp_minimal.cmake), no OpenMP / BLAS / OpenSSL -- on every core: about
  # 230 CPU-seconds (2 minutes on 2 idle cores; the default build is 450), once per machine. A
  # CMAKE_ARGS of your own (a CUDA build, say) is kept.
  echo "[install] building llama-cpp-python 0.3.36 from source for the GGUF tests (CPU, a few minutes)"
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$PWD/launch/llama_cpp_minimal.cmake}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
fi
"$PY" -m pip install -q -e ".$extras"
