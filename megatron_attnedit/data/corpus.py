"""The embedded corpus: the Python standard library source of the running interpreter.

Every machine that runs this project has it, so the bundled teacher, the quickstart and the tests
need no download. What is in it:

* every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, walked in sorted order, paths
  relative to that root in POSIX form (``json/decoder.py``);
* not the directories named in ``EXCLUDED_DIRS``: installed packages (``site-packages``,
  ``dist-packages``), byte-code caches, and the test suites (``test``, ``tests``, ``idle_test``).
  The test suites are left out because whether they exist depends on who packaged the interpreter
  (the official Docker images and Debian/Ubuntu's ``python3`` strip them, pyenv/conda keep them),
  and they deliberately hold undecodable, mis-encoded and malformed files; without them the corpus
  is the same kind of text everywhere (about 12 MB in CPython 3.11);
* not files that are not valid UTF-8, are only whitespace, or contain U+2581 (the SentencePiece
  whitespace marker, which could not round-trip through the tokenizer; CPython has none).

Windows line ends are normalised to ``\\n``; nothing else is touched.

Train/valid split, per file: SHA-256 of the relative path, first 8 bytes as an integer, modulo
10000; below ``valid_fraction * 10000`` is valid. A file's split depends only on its path, so it is
the same on every interpreter that has the file (3.11 and 3.12 differ in which files exist, not in
where a shared file goes), independent of walk order, and adding or removing other files moves
nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import sysconfig
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from megatron_attnedit.errors import DataError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
VALID_FRACTION = 0.05
"""5%: about 37 files / 0.6 MB in CPython 3.11, enough for a stable held-out loss (2% would be ~15 files)."""
SPLITS = ("train", "valid")
MANIFEST = "manifest.json"
SP_WHITESPACE = "\u2581"
FORMAT_VERSION = 1



def stdlib_dir() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def interpreter() -> Dict[str, str]:
    """Which interpreter's standard library this is (recorded in manifests and model cards)."""
    return {
        "implementation": platform.python_implementation(),
        "version": platform.python_version(),
        "version_short": f"{sys.version_info.major}.{sys.version_info.minor}",
        "stdlib": stdlib_dir(),
        "platform": sys.platform,
    }


def split_of(relpath: str, valid_fraction: float = VALID_FRACTION) -> str:
    """'train' or 'valid' for a relative POSIX path (see the module docstring)."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return "valid" if h % 10000 < round(valid_fraction * 10000) else "train"


def _read(path: str) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) or (None, reason it is skipped)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if not text.strip():
        return None, "empty"
    if SP_WHITESPACE in text:
        return None, "has_u2581"
    return text.replace("\r\n", "\n"), None


def iter_files(root: Optional[str] = None, skipped: Optional[Dict[str, int]] = None,
               keep: Optional[Callable[[str], bool]] = None) -> Iterator[Tuple[str, str]]:
    """(relative path, text) of every corpus file under ``root`` (default: this interpreter's
    stdlib), sorted by path; only paths for which ``keep(path)`` is true are read. Skipped files
    are counted by reason into ``skipped``."""
    root = os.path.abspath(root or stdlib_dir())
    if not os.path.isdir(root):
        raise DataError(f"standard library directory {root} not found; is this a full Python installation?")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked directories are not followed
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and os.path.isfile(path):
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    for rel in sorted(found):
        if keep is not None and not keep(rel):
            continue
        text, reason = _read(os.path.join(root, rel))
        if text is None:
            if skipped is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield rel, text


def split_files(split: str, root: Optional[str] = None, valid_fraction: float = VALID_FRACTION) -> List[Tuple[str, str]]:
    """The (path, text) pairs of one split, in memory (the valid split is ~0.6 MB)."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return list(iter_files(root, keep=lambda p: split_of(p, valid_fraction) == split))


def build_corpus(out_dir: str, root: Optional[str] = None, valid_fraction: float = VALID_FRACTION) -> dict:
    """Write ``train.jsonl`` and ``valid.jsonl`` (one ``{"path", "text"}`` object per file, sorted
    by path: the input of checkpoints_tools/preprocess_data.py) and ``manifest.json`` to ``out_dir``.
    Files are written under temporary names and renamed, the manifest last. Returns the manifest."""
    if not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction={valid_fraction} must be between 0 and 1")
    os.makedirs(out_dir, exist_ok=True)
    skipped: Dict[str, int] = {}
    stats = {s: {"files": 0, "chars": 0, "bytes": 0} for s in SPLITS}
    digests = {s: hashlib.sha256() for s in SPLITS}
    tmp = {s: os.path.join(out_dir, f"{s}.jsonl.tmp{os.getpid()}") for s in SPLITS}
    handles = {s: open(tmp[s], "w", encoding="utf-8") for s in SPLITS}
    try:
        for rel, text in iter_files(root, skipped):
            s = split_of(rel, valid_fraction)
            handles[s].write(json.dumps({"path": rel, "text": text}, ensure_ascii=False) + "\n")
            data = text.encode("utf-8")
            st = stats[s]
            st["files"] += 1
            st["chars"] += len(text)
            st["bytes"] += len(data)
            digests[s].update(rel.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
        for h in handles.values():
            h.close()
        if stats["train"]["files"] == 0 or stats["valid"]["files"] == 0:
            raise DataError(f"the corpus under {root or stdlib_dir()} has {stats['train']['files']} train and "
                              f"{stats['valid']['files']} valid files; both must be non-empty")
        for s in SPLITS:
            os.replace(tmp[s], os.path.join(out_dir, f"{s}.jsonl"))
    finally:
        for s in SPLITS:
            handles[s].close()
            if os.path.exists(tmp[s]):
                os.remove(tmp[s])
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": "Python standard library (*.py)",
        "interpreter": interpreter() if root is None else {**interpreter(), "stdlib": os.path.abspath(root)},
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "valid_fraction": valid_fraction,
        "split_rule": "valid iff int.from_bytes(sha256(relpath).digest()[:8], 'big') % 10000 < round(valid_fraction * 10000)",
        "skipped": dict(sorted(skipped.items())),
        "splits": {s: {**stats[s], "sha256": digests[s].hexdigest()} for s in SPLITS},
    }
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def load_manifest(corpus_dir: str) -> dict:
    path = os.path.join(corpus_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; build the corpus with `python -m megatron_attnedit.teacher corpus --out {corpus_dir}`")
    with open(path) as f:
        return json.load(f)


def read_split(corpus_dir: str, split: str) -> Iterator[str]:
    """The texts of one split of a written corpus, in file order."""
    load_manifest(corpus_dir)
    with open(os.path.join(corpus_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
