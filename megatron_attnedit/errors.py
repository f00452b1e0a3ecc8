"""What a command does when something goes wrong: one line, an exit code, no traceback.

The vocabulary: ``UserError`` (exit 2) and its subclasses ``ConfigError``, ``CheckpointError``,
``DataError``, ``EvalError``; ``RunFault`` (exit 1) and its subclasses ``TrainingStopped``,
``StepFailed``. Every module raises these (no module defines its own error class), so a command
catches by type.

Every command line of the project (converters, ``train``, ``evaluate``, ``teacher``, ``kv_report``,
``quickstart``, ``preprocess_data``) runs its body through :func:`run_cli`, which turns

* a :class:`UserError` (bad input: a config, a flag, a checkpoint or data file that cannot be used)
  into ``error: <what was wrong; what to do>`` and exit code 2;
* an environment fault (``OSError``: disk full, unwritable path, missing file) into the same kind
  of line, exit code 2 before the run has started and 1 once it has (``started()``);
* a :class:`RunFault` (the run itself stopped: a NaN loss, a failed step) into one line, exit 1;
* running out of accelerator memory into one line with the levers that lower it, exit 1;
* Ctrl-C / SIGTERM into ``error: interrupted``, exit 130;
* anything else (a bug, or a dependency's error we did not anticipate) into one line naming the
  exception type, exit 1.

``--debug`` on the command line or ``ATTNEDIT_DEBUG=1`` in the environment re-raises instead, so
the traceback is there when it is wanted. The output a command writes is never left half-written
(``convert/outdir.py``, ``training/checkpoint.py``): the line is the whole story.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, List, Optional

EXIT_USER = 2
EXIT_FAULT = 1
EXIT_INTERRUPTED = 130
DEBUG_ENV = "ATTNEDIT_DEBUG"


class UserError(ValueError):
    """Bad input, seen where it is first read; the message says what was wrong and what to do."""


class ConfigError(UserError):
    """A recipe, an override, a model config, a target's options, a parallel layout or a
    teacher/student pairing that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint (HF or megatron, its files or its metadata) that cannot be used."""


class DataError(UserError):
    """Training or evaluation data, a tokenizer or a corpus that cannot be used."""


class EvalError(UserError):
    """An evaluation's input (a model the decode engine cannot run, a report directory, a length)."""


class RunFault(RuntimeError):
    """The run started and could not go on (exit code 1); the message says why and what to do."""


class TrainingStopped(RunFault):
    """Training stopped on a non-finite loss or gradient norm."""


class StepFailed(RunFault):
    """A step of a multi-step command (quickstart, scale study) failed; the message names its log."""


def read_json_object(path: str, what: str = "restore the model's config.json", error=UserError) -> dict:
    """A JSON object from ``path``; a file that is not JSON or not an object is one line (``error``)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {what}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object; {what}")
    return value


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def debug_requested(argv: Optional[List[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug(argv: Optional[List[str]]) -> List[str]:
    """argv without ``--debug`` (the commands' parsers do not know it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return [a for a in argv if a != "--debug"]


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free space or write elsewhere",
    errno.EFBIG: "file too large for the file system or the file-size limit (ulimit -f); write elsewhere or raise the limit",
    errno.EACCES: "permission denied; choose a path you can write to (or read)",
    errno.EPERM: "operation not permitted; choose a path you can write to (or read)",
    errno.EROFS: "read-only file system; write elsewhere",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a part of the path is not a directory; check the path",
    errno.EISDIR: "a directory was given where a file is expected; check the path",
    errno.EIO: "input/output error from the storage; check the device",
}


def describe_os_error(e: OSError) -> str:
    """One line for an environment fault: the path, what happened, what to do."""
    where = " -> ".join(p for p in (e.filename, getattr(e, "filename2", None)) if p)
    advice = _OS_ADVICE.get(e.errno, e.strerror or type(e).__name__)
    return one_line(f"{where}: {advice}" if where else f"{advice} ({e})")


class _Phase:
    started = False


_phase = _Phase()


def started() -> None:
    """Mark that the run proper has begun: environment faults from now on exit with 1."""
    _phase.started = True


def _print(msg: str, rank0: bool) -> None:
    if rank0:
        print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)


def run_cli(body: Callable[[], Optional[int]], argv: Optional[List[str]] = None, rank0: bool = True,
            interrupt_message: str = "interrupted") -> int:
    """Run ``body`` and map what it raises to one stderr line and an exit code (module docstring)."""
    debug = debug_requested(argv)
    _phase.started = False
    try:
        rc = body()
        return 0 if rc is None else int(rc)
    except KeyboardInterrupt:
        _print(interrupt_message, rank0)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # argparse and a few start-up checks report this way
        if isinstance(e.code, str):
            msg = e.code[len("error: "):] if e.code.startswith("error: ") else e.code
            _print(msg, rank0)
            return EXIT_USER
        raise
    except Exception as e:
        if debug:
            raise
        if isinstance(e, UserError):
            _print(str(e), rank0)
            return EXIT_USER
        if isinstance(e, RunFault):
            _print(str(e), rank0)
            return EXIT_FAULT
        if isinstance(e, OSError):
            _print(describe_os_error(e), rank0)
            return EXIT_FAULT if _phase.started else EXIT_USER
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA, NPU), without importing torch
            first = ". ".join(str(e).split(". ")[:2])  # "CUDA out of memory. Tried to allocate N MiB"
            _print(f"out of accelerator memory ({first}); lower data.micro_batch_size, raise parallel.tensor_model_parallel_size, "
                   f"or set model.recompute_granularity (README, Training)", rank0)
            return EXIT_FAULT
        _print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
               f"(unexpected; rerun with --debug or {DEBUG_ENV}=1 for the traceback)", rank0)
        return EXIT_FAULT
