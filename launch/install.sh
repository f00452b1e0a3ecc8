#!/usr/bin/env bash
# Installs megatron-attnedit and what it needs into the current Python environment.
#   bash launch/install.sh [--test]     (--test: the test extras, including llama-cpp-python built from source, CPU)
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
# Fast path: the project is installed from this checkout and every pinned dependency is installed
# at its pinned version (requirements*.txt); anything else reinstalls, so a user gets what CI ran.
pins="requirements.txt"
[ -n "$extras" ] && pins="$pins requirements-test.txt"
if "$PY" - $pins >/dev/null 2>&1 <<'PY'
import os, sys
from importlib.metadata import distribution, requires, version
import megatron_attnedit
assert os.path.dirname(os.path.dirname(os.path.abspath(megatron_attnedit.__file__))) == os.getcwd()
declared = {r.split(";")[0].replace(" ", "") for r in requires("megatron-attnedit") or []}
assert any(e.name == "attnedit" for e in distribution("megatron-attnedit").entry_points)  # the console command (setup.py)
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            name, pinned = line.split("==")
            assert version(name) == pinned and line in declared, (name, version(name), pinned)
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
