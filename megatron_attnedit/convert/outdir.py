"""Output directories of the converters: refuse to clobber, write aside, rename into place.

A conversion writes into a hidden sibling (``.NAME.partial-XXXX``) that becomes ``NAME`` only
when complete; on an error or an interrupt it is removed. An existing checkpoint is replaced
only with --overwrite, and a non-empty directory that does not look like a checkpoint never.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Sequence

from megatron_attnedit.convert.checkpoint import TRACKER
from megatron_attnedit.convert.hf_io import INDEX, CheckpointError


def _looks_like_checkpoint(d: str) -> bool:
    names = set(os.listdir(d))
    return bool(
        TRACKER in names
        or "release" in names
        or any(n.startswith("iter_") for n in names)
        or INDEX in names
        or "config.json" in names
        or any(n.endswith(".safetensors") for n in names)
        or "metadata.json" in names
        or any(n.startswith("mp_rank_") for n in names)
    )


def check_output_dir(path: str, overwrite: bool, sources: Sequence[str] = ()) -> None:
    """Refuse an output that would clobber a checkpoint (without --overwrite), anything that is not a
    checkpoint (even with it), or the input itself."""
    real = os.path.realpath(path)
    for s in sources:
        rs = os.path.realpath(s)
        if real == rs or rs.startswith(real + os.sep):
            raise CheckpointError(f"--save-dir {path} would replace the input {s}; choose another directory")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise CheckpointError(f"--save-dir {path} exists and is not a directory")
    if not os.listdir(path):
        return
    if not _looks_like_checkpoint(path):
        raise CheckpointError(f"--save-dir {path} is not empty and does not look like a checkpoint; refusing to write there, choose another directory")
    if not overwrite:
        raise CheckpointError(f"--save-dir {path} already holds a checkpoint; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(path: str) -> Iterator[str]:
    """Yield a hidden temporary sibling of ``path``; on success it replaces ``path``, on any error
    (or interrupt) it is removed."""
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
