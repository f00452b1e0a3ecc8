"""Runs ``python -m megatron_attnedit.train`` command lines as forked processes of one interpreter,
so that a table of cases pays for the torch + megatron imports once. Each case gets real
processes: their own exit status, stdout and stderr (file descriptors 1 and 2), and for
``nproc`` > 1 one process per rank with torchrun's environment (RANK, WORLD_SIZE, MASTER_PORT),
so every rank's exit status and output can be checked.

    python train_cases.py CASES.json RESULT.json
CASES: [{"name", "argv": [...], "nproc": 1, "fsize_limit": bytes or null}], run in order.
``fsize_limit`` sets RLIMIT_FSIZE in the case's processes with SIGXFSZ ignored: a write past it
fails with EFBIG, as a write to a full disk fails with ENOSPC (the same write path of megatron's
checkpoint writer). RESULT: {name: [{"rc", "stdout", "stderr"} per rank]}.
"""

import json
import os
import socket
import sys
import tempfile
import warnings

from convert_cli_cases import child  # the forked process, shared with the converter cases

warnings.filterwarnings("ignore")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(main, argv, nproc=1, fsize_limit=None):
    port = str(_free_port())
    files, pids = [], []
    for rank in range(nproc):
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
        if nproc > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        pid = os.fork()
        if pid == 0:
            child(main, argv, env, fsize_limit, out, err)
        files.append((out, err))
        pids.append(pid)
    results = []
    for pid, (out, err) in zip(pids, files):
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        results.append({"rc": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(), "stderr": err.read().decode()})
        out.close()
        err.close()
    return results


def main():
    cases, result_path = json.load(open(sys.argv[1])), sys.argv[2]
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    import megatron.core.dist_checkpointing  # noqa: F401  (import once, before forking)
    import megatron.core.optimizer  # noqa: F401
    import transformers  # noqa: F401

    from megatron_attnedit.train import main as train_main
    from megatron_attnedit.training import loop  # noqa: F401

    result = {c["name"]: run_case(train_main, c["argv"], c.get("nproc", 1), c.get("fsize_limit")) for c in cases}
    json.dump(result, open(result_path, "w"), indent=1)


if __name__ == "__main__":
    main()
