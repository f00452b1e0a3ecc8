"""Output directories of the converters: write aside, rename into place, replace only our own.

A conversion writes into a hidden sibling (``.NAME.partial-XXXX``) that becomes ``NAME`` only when
complete; on an error or an interrupt it is removed. The sibling records its writer (host, PID,
process start time) in ``.attnedit-writer.json``, so a run killed outright (kill -9, a lost node)
leaves debris that the next conversion to ``NAME`` recognises as stale -- no live process is
writing it -- removes, and reports in one line (``sweep_stale``).

Every output carries ``.attnedit-manifest.json``: the tool that wrote it and every path it wrote.
``--overwrite`` replaces a directory only when all it holds is what a previous run of the same
tool wrote; anything else there (a training run's ``iter_0000050/``, a notes file, a checkpoint
from another tool or an older version) makes it refuse in one line, and nothing is deleted.

Write errors (disk full, quota) surface as ``OSError`` naming the output, and Ctrl-C / SIGTERM as
KeyboardInterrupt, even where torch's zip writer reports them as "unexpected pos" (``torch_save``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Iterator, List, Optional, Sequence, Set

import torch

from megatron_attnedit.convert.checkpoint import TRACKER
from megatron_attnedit.convert.hf_io import INDEX
from megatron_attnedit.errors import CheckpointError

MANIFEST = ".attnedit-manifest.json"
WRITER = ".attnedit-writer.json"
_DEBRIS = re.compile(r"^\.(?P<base>.+)\.(?P<kind>partial|old)-[^.]+$")


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


def _tree(d: str) -> Set[str]:
    """Every path under ``d`` (directories and files), relative, '/'-separated."""
    out = set()
    for root, dirs, files in os.walk(d):
        rel = os.path.relpath(root, d)
        for n in dirs + files:
            out.add(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
    return out


def read_manifest(d: str) -> Optional[dict]:
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            m = json.load(f)
        return m if isinstance(m, dict) and isinstance(m.get("tool"), str) and isinstance(m.get("paths"), list) else None
    except (OSError, ValueError):
        return None


def add_to_manifest(d: str, names: Sequence[str], by: str) -> None:
    """Record files another of the project's tools wrote into an output (a model card beside an
    export), so that ``--overwrite`` of that output replaces them with it instead of refusing.
    A directory without a manifest is left as it is."""
    manifest = read_manifest(d)
    if manifest is None:
        return
    added = [n for n in names if n not in manifest["paths"]]
    manifest["paths"] = sorted(manifest["paths"] + added)
    manifest.setdefault("added_by", {}).setdefault(by, [])
    manifest["added_by"][by] = sorted(set(manifest["added_by"][by]) | set(names))
    tmp = os.path.join(d, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(d, MANIFEST))


def _foreign(d: str, manifest: dict) -> List[str]:
    """Top-level names of what ``d`` holds beyond the paths its manifest lists."""
    recorded = set(manifest["paths"]) | {MANIFEST, WRITER}
    extra = sorted(_tree(d) - recorded)
    tops = []
    for p in extra:
        top = p.split("/")[0]
        name = top if top not in recorded else p
        if not any(name == t or name.startswith(t + "/") for t in tops):
            tops.append(name)
    return tops


def check_output_dir(path: str, overwrite: bool, tool: str, sources: Sequence[str] = ()) -> None:
    """Refuse an output that would clobber a checkpoint (without --overwrite), anything this tool
    did not write (even with it), or the input itself."""
    real = os.path.realpath(path)
    for s in sources:
        rs = os.path.realpath(s)
        if real == rs or rs.startswith(real + os.sep):
            raise CheckpointError(f"--save-dir {path} would replace the input {s}; choose another directory")
    if not os.path.exists(path):
        ancestor = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise CheckpointError(f"--save-dir {path}: {ancestor} is a file, not a directory; choose another path")
        return
    if not os.path.isdir(path):
        raise CheckpointError(f"--save-dir {path} exists and is not a directory")
    if not os.listdir(path):
        return
    manifest = read_manifest(path)
    if manifest is None:
        if not _looks_like_checkpoint(path):
            raise CheckpointError(f"--save-dir {path} is not empty and does not look like a checkpoint; refusing to write there, choose another directory")
        raise CheckpointError(
            f"--save-dir {path} already holds a checkpoint that {tool} did not write (no {MANIFEST}: another tool or an older "
            f"version); --overwrite replaces only {tool}'s own output: move it away or choose another directory"
        )
    if manifest["tool"] != tool:
        raise CheckpointError(f"--save-dir {path} holds the output of {manifest['tool']}; {tool} will not replace it: choose another directory")
    foreign = _foreign(path, manifest)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise CheckpointError(
            f"--save-dir {path} also holds {', '.join(foreign[:3])}{more}, which {tool} did not write; --overwrite replaces only "
            f"{tool}'s own output: move those away or choose another directory"
        )
    if not overwrite:
        raise CheckpointError(f"--save-dir {path} already holds a checkpoint written by {tool}; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------
# Writing aside, and the debris of runs that were killed
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (tells a live writer from a later process with its PID)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record_writer(d: str, tool: str) -> None:
    rec = {"tool": tool, "host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
    with open(os.path.join(d, WRITER), "w") as f:
        json.dump(rec, f)


def _writer_alive(rec: dict) -> bool:
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user has this PID
    start = _process_start(pid)
    return start is None or rec.get("start") is None or start == rec["start"]


def sweep_stale(path: str) -> List[str]:
    """Remove the hidden ``.NAME.partial-*`` / ``.NAME.old-*`` siblings of ``path`` that runs killed
    outright left and that no live process is writing; returns one line per sibling found, for the
    user (removed, or left with the reason)."""
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    notes = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return notes
    host = socket.gethostname()
    for n in names:
        m = _DEBRIS.match(n)
        d = os.path.join(parent, n)
        if not m or m.group("base") != base or not os.path.isdir(d):
            continue
        size = f"{dir_bytes(d) / 1e6:.1f} MB"
        try:
            with open(os.path.join(d, WRITER)) as f:
                rec = json.load(f)
            if not isinstance(rec, dict):
                rec = None
        except (OSError, ValueError):
            rec = None
        if rec is None:
            notes.append(f"{d} ({size}) was left by an interrupted conversion that did not record its writer; "
                         f"remove it if no conversion is writing {base}")
        elif rec.get("host") != host:
            notes.append(f"{d} ({size}) is being written, or was left, by a conversion on host {rec.get('host')} "
                         f"(pid {rec.get('pid')}); remove it if none is running there")
        elif _writer_alive(rec):
            notes.append(f"{d} ({size}) is being written by a running conversion (pid {rec['pid']}); left alone")
        else:
            shutil.rmtree(d, ignore_errors=True)
            notes.append(f"removed {d} ({size}), left by an interrupted conversion (pid {rec.get('pid')}, no longer running)")
    return notes


def write_failure(e: BaseException, path: str) -> Optional[BaseException]:
    """What really stopped a ``torch.save`` to a Python file: torch's zip writer turns the
    exception its write callback raised -- a failed write's OSError (disk full), or the
    KeyboardInterrupt of Ctrl-C / SIGTERM -- into "unexpected pos", keeping it as the context."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return KeyboardInterrupt()
        if isinstance(e, OSError):
            return OSError(e.errno, e.strerror, path)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def torch_save(obj, path_or_file) -> None:
    """``torch.save`` through a Python file, so that a failed write (disk full) raises its OSError
    and an interrupt its KeyboardInterrupt, not torch's "unexpected pos" RuntimeError."""
    if isinstance(path_or_file, str):
        with open(path_or_file, "wb") as f:
            return torch_save(obj, f)
    try:
        torch.save(obj, path_or_file)
    except RuntimeError as e:
        cause = write_failure(e, path_or_file.name)
        if cause is None:
            raise
        raise cause from None


@contextlib.contextmanager
def atomic_output_dir(path: str, tool: str) -> Iterator[str]:
    """Yield a hidden temporary sibling of ``path``; on success it gets a manifest of what it holds
    and replaces ``path``; on any error (or interrupt) it is removed. An OSError while writing (disk
    full, read-only) is re-raised naming ``path``, what the user asked for, not the sibling."""
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    except OSError as e:  # name what the user asked for, not our hidden sibling
        raise OSError(e.errno, e.strerror, path) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any mkdir
        _record_writer(tmp, tool)
        yield tmp
        written = sorted(_tree(tmp) - {WRITER})
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"tool": tool, "paths": written}, f, indent=1)
            f.write("\n")
        if os.path.exists(path):
            check_output_dir(path, True, tool)  # nothing else appeared there while we wrote
            old = os.path.join(parent, os.path.basename(tmp).replace(".partial-", ".old-", 1))
            os.rename(path, old)
            try:
                _record_writer(old, tool)  # until it is gone, it is debris that names its writer
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, WRITER))
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        os.remove(os.path.join(path, WRITER))  # the record travels with the data until it is in place
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None or str(e.filename).startswith(tmp):  # a failed write: name the output, not the removed sibling
            raise OSError(e.errno, e.strerror, path) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


GGUF_MAGIC = b"GGUF"


def check_output_file(path: str, overwrite: bool, tool: str, sources: Sequence[str] = ()) -> None:
    """Refuse an output file that exists (without --overwrite), that is not a GGUF file (even with
    it), or that lies inside an input."""
    real = os.path.realpath(path)
    for s in sources:
        if real == os.path.realpath(s):
            raise CheckpointError(f"--out {path} would replace the input {s}; choose another path")
    if os.path.isdir(path):
        raise CheckpointError(f"--out {path} is a directory; name the .gguf file to write")
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"--out {path} exists and cannot be read ({e.strerror}); choose another path") from None
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"--out {path} exists and is not a GGUF file; {tool} will not replace it: choose another path")
    if not overwrite:
        raise CheckpointError(f"--out {path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_file(path: str, tool: str) -> Iterator[str]:
    """Yield a temporary path for the file ``path``, inside a hidden sibling directory that records
    its writer, as ``atomic_output_dir`` does (a run killed outright leaves debris that
    ``sweep_stale(path)`` recognises); on success the file replaces ``path`` in one rename, on any
    error (or interrupt) nothing is left."""
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        _record_writer(tmp, tool)
        yield os.path.join(tmp, base)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(tmp, base), 0o666 & ~umask)
        os.replace(os.path.join(tmp, base), path)
    except OSError as e:
        if e.filename is None or str(e.filename).startswith(tmp):
            raise OSError(e.errno, e.strerror, path) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dir_bytes(d: str) -> int:
    total = 0
    for r, _, fs in os.walk(d):
        for f in fs:
            try:
                total += os.path.getsize(os.path.join(r, f))
            except OSError:  # removed while we walked
                pass
    return total
