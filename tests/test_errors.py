"""errors.run_cli: the one place that turns what a command raises into one line and an exit code."""

import errno

import pytest
import torch

from megatron_attnedit import errors
from megatron_attnedit.errors import RunFault, UserError, run_cli


def _run(capsys, exc, argv=(), started=False):
    def body():
        if started:
            errors.started()
        raise exc

    capsys.readouterr()
    rc = run_cli(body, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("exc,rc,fragment", [
    (UserError("bad recipe; fix it"), 2, "bad recipe; fix it"),
    (RunFault("loss is nan"), 1, "loss is nan"),
    (OSError(errno.ENOSPC, "No space left on device", "/ckpt/iter_0000010/x.distcp"), 2, "no space left on the device"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 2, "permission denied"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB. GPU 0 has a total capacity of 79.18 GiB"), 1,
     "Tried to allocate 768.00 MiB"),
    (KeyError("model.layers.0"), 1, "KeyError"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_one_line_and_exit_code(capsys, exc, rc, fragment):
    got, err = _run(capsys, exc)
    assert got == rc and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (got, err)


def test_environment_fault_during_the_run_exits_1(capsys):
    rc, err = _run(capsys, OSError(errno.ENOSPC, "No space left on device", "/ckpt/x"), started=True)
    assert rc == 1 and "/ckpt/x" in err[0]


def test_debug_shows_the_traceback(capsys, monkeypatch):
    with pytest.raises(KeyError):
        _run(capsys, KeyError("x"), argv=["--debug"])
    monkeypatch.setenv("ATTNEDIT_DEBUG", "1")
    with pytest.raises(UserError):
        _run(capsys, UserError("x"))


def test_json_reader(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"a": 1,')
    with pytest.raises(UserError, match="not valid JSON"):
        errors.read_json_object(str(p))
    p.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON list, not an object"):
        errors.read_json_object(str(p))
    p.write_text('{"a": 1}')
    assert errors.read_json_object(str(p)) == {"a": 1}
