# Which Python the project runs on: one answer for install.sh, the launchers (common.sh,
# quickstart.sh, scale_study.sh) and tests/run_tests.sh. Sourced, not run.
#
#   attnedit_python            prints the interpreter to use
#   attnedit_python --create   the same, and makes the project venv .venv when that is the choice
#                              (install.sh); says on stderr, in one line, which stack it chose and why
#   attnedit_find_python 3.11  prints a Python 3.11 found on this machine (PATH, pyenv), or nothing
#
# The choice, first that holds:
#   1. $PYTHON, when set (the user's own environment; never second-guessed)
#   2. python3, when it is Python >= 3.12: the primary stack, megatron-core 0.19.2
#   3. the project venv .venv (gitignored), when it exists and runs Python >= 3.12
#   4. a Python 3.12 (else 3.13) found as python3.12 / python3.13 on the PATH or under pyenv or uv:
#      with --create, .venv is made with it (--system-site-packages: a torch already installed for
#      that Python is used, never replaced); without, python3 (nothing is created by a launcher)
#   5. python3: the fallback stack, megatron-core 0.16.1 on Python 3.11 (every megatron-core since
#      0.17 requires Python >= 3.12)

ATTNEDIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ATTNEDIT_VENV="$ATTNEDIT_ROOT/.venv"

_attnedit_py_version() {  # "3.12" for a working interpreter, nothing (status 1) otherwise
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

_attnedit_at_least_312() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

attnedit_find_python() {
  local want=$1 cand
  # pyenv's shims answer for every version pyenv has but run only the selected one: each candidate
  # is run once to see that it works and is the version asked for
  for cand in "$(command -v "python$want" 2>/dev/null)" \
      $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/"python$want" 2>/dev/null | sort -rV) \
      $(ls -d "$HOME"/.local/share/uv/python/cpython-"$want".*/bin/"python$want" 2>/dev/null | sort -rV); do
    if [ -n "$cand" ] && [ "$(_attnedit_py_version "$cand")" = "$want" ]; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

attnedit_python() {
  local create=0 base
  [ "${1:-}" = "--create" ] && create=1
  if [ -n "${PYTHON:-}" ]; then
    if [ $create = 1 ] && ! _attnedit_at_least_312 "$PYTHON"; then
      echo "[install] PYTHON=$PYTHON is Python $(_attnedit_py_version "$PYTHON" || echo '?'): the fallback stack, megatron-core 0.16.1" >&2
    fi
    echo "$PYTHON"
    return 0
  fi
  if _attnedit_at_least_312 python3; then
    echo python3
    return 0
  fi
  if _attnedit_at_least_312 "$ATTNEDIT_VENV/bin/python"; then
    [ $create = 1 ] && echo "[install] python3 is Python $(_attnedit_py_version python3): using the project venv .venv (Python $(_attnedit_py_version "$ATTNEDIT_VENV/bin/python"), megatron-core 0.19.2); activate it (source .venv/bin/activate) to run attnedit directly" >&2
    echo "$ATTNEDIT_VENV/bin/python"
    return 0
  fi
  if [ $create = 1 ] && base=$(attnedit_find_python 3.12 || attnedit_find_python 3.13); then
    echo "[install] python3 is Python $(_attnedit_py_version python3): making the project venv .venv with $base (Python $(_attnedit_py_version "$base"), megatron-core 0.19.2); activate it (source .venv/bin/activate) to run attnedit directly" >&2
    if ! "$base" -m venv --clear --system-site-packages "$ATTNEDIT_VENV" >&2; then
      echo "error: $base could not make a venv at $ATTNEDIT_VENV (a distribution's Python may need its venv package, e.g. python3.12-venv); or set PYTHON=python3 for the fallback stack" >&2
      return 1
    fi
    echo "$ATTNEDIT_VENV/bin/python"
    return 0
  fi
  [ $create = 1 ] && echo "[install] python3 is Python $(_attnedit_py_version python3 || echo '?') and no Python >= 3.12 was found: installing the fallback stack, megatron-core 0.16.1; for the primary stack (megatron-core 0.19.2) install Python 3.12 (pyenv install 3.12, uv python install 3.12, or your distribution's python3.12) and rerun" >&2
  echo python3
}
