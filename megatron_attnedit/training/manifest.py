"""A checkpoint's manifest: what a complete iteration directory holds, to tell it from a damaged one.

Rank 0 writes ``manifest.json`` into ``iter_XXXXXXX.tmp`` as the last file, after
dist_checkpointing and the side files (config.yaml, hf_assets/) are written and before the
directory is renamed. It lists every file with its size and a CRC-32: of the whole file up to
``FULL_CRC_BYTES``, of its first and last ``EDGE_BYTES`` beyond. Sizes catch what a full disk, a
killed copy or a truncating tool leave behind (a short ``.distcp``); the checksums catch
overwritten small files (``common.pt``, ``.metadata``, ``metadata.json``) and damaged headers and
tails of the large ones. A full checksum of a multi-GB shard would cost a read of the whole
checkpoint on every save and every resume; these cost at most 2 x EDGE_BYTES per large file.

A directory without a manifest (written before manifests existed, or by a converter) counts as
complete when it has ``metadata.json``, as it always did.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Dict, Optional

MANIFEST = "manifest.json"
VERSION = 1
FULL_CRC_BYTES = 8 << 20
EDGE_BYTES = 1 << 20
_CHUNK = 1 << 20


def _crc(path: str, size: int, full: int = FULL_CRC_BYTES, edge: int = EDGE_BYTES) -> str:
    """CRC-32 of the file (up to ``full`` bytes) or of its first and last ``edge`` bytes, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        if size <= full:
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
        else:
            crc = zlib.crc32(f.read(edge), crc)
            f.seek(size - edge)
            crc = zlib.crc32(f.read(edge), crc)
    return f"{crc:08x}"


def _files(root: str) -> Dict[str, str]:
    """{relative path: path} of every regular file under root, the manifest itself excluded."""
    out = {}
    for base, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(base, n), root)
            if rel != MANIFEST:
                out[rel] = os.path.join(base, n)
    return out


def write(iter_path: str, iteration: int) -> str:
    """Write ``iter_path/manifest.json`` (fsynced) describing every file now in ``iter_path``."""
    files = {}
    for rel, path in _files(iter_path).items():
        size = os.path.getsize(path)
        files[rel] = {"size": size, "crc32": _crc(path, size)}
    out = os.path.join(iter_path, MANIFEST)
    with open(out, "w") as f:
        json.dump({"version": VERSION, "iteration": iteration, "full_crc_bytes": FULL_CRC_BYTES, "edge_bytes": EDGE_BYTES,
                   "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return out


def problem(iter_path: str) -> Optional[str]:
    """Why ``iter_path`` is not a complete checkpoint (a short phrase), or None when it is one.
    Checks the manifest when there is one, else only that ``metadata.json`` exists."""
    if not os.path.isdir(iter_path):
        return "its directory is missing"
    if not os.path.isfile(os.path.join(iter_path, "metadata.json")):
        return "it has no metadata.json (incomplete)"
    path = os.path.join(iter_path, MANIFEST)
    if not os.path.isfile(path):
        return None  # written before manifests: as complete as it always was
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        full, edge = int(manifest.get("full_crc_bytes", FULL_CRC_BYTES)), int(manifest.get("edge_bytes", EDGE_BYTES))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    for rel, want in sorted(files.items()):
        p = os.path.join(iter_path, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{rel} is {size:,} bytes where {want['size']:,} were written (truncated or damaged)"
        try:
            if _crc(p, size, full, edge) != want["crc32"]:
                return f"{rel} does not match its checksum (damaged)"
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror or type(e).__name__})"
    return None
