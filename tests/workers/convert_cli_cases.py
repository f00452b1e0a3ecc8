"""Runs converter command lines (cli.hf_to_mcore_main / mcore_to_hf_main) as forked processes of
one interpreter, so that a dozen cases pay for the torch + megatron imports once. Each case gets
a real process: its own exit status, stdout and stderr (file descriptors 1 and 2).

    python convert_cli_cases.py CASES.json RESULT.json
CASES: [{"name", "tool": "hf_to_mcore" | "mcore_to_hf", "argv": [...], "fsize_limit": bytes (optional)}], run in
order. ``fsize_limit`` sets RLIMIT_FSIZE in the case's process with SIGXFSZ ignored: a write past it
fails with EFBIG, as a write to a full disk fails with ENOSPC (the same OSError path).
RESULT: {name: {"rc", "stdout", "stderr"}}.
"""

import json
import os
import resource
import signal
import sys
import tempfile
import traceback
import warnings

warnings.filterwarnings("ignore")  # as the thin CLI scripts do


def child(main, argv, env, fsize_limit, out, err):
    """The forked process: stdout/stderr to ``out``/``err``, ``env`` set, the optional file-size
    limit, then ``main(argv)``; exits with its status (99 and the traceback if it raised)."""
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    os.environ.update(env)
    if fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_case(main, argv, fsize_limit=None):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            child(main, argv, {}, fsize_limit, out, err)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"rc": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(), "stderr": err.read().decode()}


def main():
    cases, result_path = json.load(open(sys.argv[1])), sys.argv[2]
    from megatron_attnedit.cli import convert as cli
    from megatron_attnedit.convert import converters  # noqa: F401  (import once, before forking)

    tools = {"hf_to_mcore": cli.hf_to_mcore_main, "mcore_to_hf": cli.mcore_to_hf_main}
    result = {c["name"]: run_case(tools[c["tool"]], c["argv"], c.get("fsize_limit")) for c in cases}
    json.dump(result, open(result_path, "w"), indent=1)


if __name__ == "__main__":
    main()
