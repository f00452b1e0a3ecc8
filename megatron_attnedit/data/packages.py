"""A larger corpus: the Python sources of the packages installed in this interpreter.

The stdlib corpus (corpus.py) is ~3.4M tokens: enough for the bundled 6.8M-parameter teacher, far
too little for a 60-150M one. Every machine that runs this project also has its dependencies
installed -- on the GPU image torch, transformers, jax, scipy, pandas, scikit-learn, sympy and more
-- hundreds of MB of real Python that nobody here wrote, on the machine, without a download.

What is in it:

* the ``*.py`` files each installed distribution lists in its RECORD (``importlib.metadata``: the
  same set pip would uninstall), for every distribution on ``sys.path`` -- which ones depends on the
  machine, so the manifest records every package with its version, files, bytes and split;
* not this project (``EXCLUDED_DISTRIBUTIONS``: its own code is not text nobody here wrote), not
  files outside the site directory (RECORD entries like ``../../bin/x``), not files larger than
  ``MAX_FILE_BYTES`` (generated tables: sympy's and fontTools' Unicode data, protobuf output);
* a file whose content (after CRLF -> LF) is byte-identical to one already taken is a duplicate
  and left out: vendored copies (pip's, setuptools' vendored packages) and the same file shipped by
  two distributions count once, credited to whichever copy comes first in the sampling order below;
* the same UTF-8 / empty / U+2581 rules as the stdlib corpus.

Split, per file: by the SHA-256 of its content (first 8 bytes as an integer, modulo 10000, below
``valid_fraction * 10000`` is held out). A file's split depends only on its text, so a duplicate
can never land on both sides, and the same file is on the same side on every machine.

``max_bytes`` bounds the corpus (tokenizing and training time): files are taken in the order of
the SHA-256 of ``distribution/path`` -- a deterministic sample spread over all packages, not the
first packages alphabetically -- until the budget is used. The files are then written in
(distribution, path) order, the same ``train.jsonl`` / ``valid.jsonl`` / ``manifest.json`` layout
as corpus.py, so ``teacher.prepare_datasets`` and ``preprocess_data.py`` read it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Dict, Iterable, List, Optional, Tuple

from megatron_attnedit.data import recall
from megatron_attnedit.data.corpus import SPLITS, _read, _write_json, interpreter
from megatron_attnedit.errors import DataError

EXCLUDED_DISTRIBUTIONS = frozenset({"megatron-attnedit", "megatron_attnedit"})
MAX_FILE_BYTES = 1_000_000
VALID_FRACTION = 0.02
"""2% of ~300 MB is ~6 MB held out: far more than a 4096-token evaluation reads, and it leaves the
teacher the rest."""
FORMAT_VERSION = 1


def split_of_content(digest: bytes, valid_fraction: float = VALID_FRACTION) -> str:
    """'train' or 'valid' from a file's content SHA-256 (see the module docstring)."""
    h = int.from_bytes(digest[:8], "big")
    return "valid" if h % 10000 < round(valid_fraction * 10000) else "train"


def _norm_name(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def distributions(exclude: Iterable[str] = EXCLUDED_DISTRIBUTIONS, only: Optional[Iterable[str]] = None) -> List[dict]:
    """Installed distributions with their ``*.py`` files: [{name, version, root, files: [rel, ...]}],
    sorted by name. A name found twice on ``sys.path`` counts once (the first, as import does)."""
    import importlib.metadata as md

    excluded = {_norm_name(n) for n in exclude}
    wanted = None if only is None else {_norm_name(n) for n in only}
    seen, out = set(), []
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        key = _norm_name(name)
        if key in seen or key in excluded or (wanted is not None and key not in wanted):
            continue
        seen.add(key)
        files = []
        root = os.path.abspath(str(dist.locate_file("")))
        for f in dist.files or []:  # None: no RECORD (e.g. a distutils install); nothing to list
            rel = str(f).replace(os.sep, "/")
            if not rel.endswith(".py") or rel.startswith("../") or "/../" in rel:
                continue
            files.append(rel)
        if files:
            out.append({"name": name, "version": dist.version, "root": root, "files": sorted(set(files))})
    if wanted is not None:
        missing = sorted(wanted - {_norm_name(d["name"]) for d in out})
        if missing:
            raise DataError(f"package(s) {', '.join(missing)} not installed (or have no Python files); "
                              "leave them out of the package list")
    return sorted(out, key=lambda d: _norm_name(d["name"]))


def _sample_key(name: str, rel: str) -> bytes:
    return hashlib.sha256(f"{_norm_name(name)}/{rel}".encode("utf-8")).digest()


def build_package_corpus(out_dir: str, max_bytes: Optional[int] = None, valid_fraction: float = VALID_FRACTION,
                         packages: Optional[Iterable[str]] = None, exclude: Iterable[str] = EXCLUDED_DISTRIBUTIONS,
                         max_file_bytes: int = MAX_FILE_BYTES, recall_share: float = 0.0) -> dict:
    """Write ``train.jsonl``, ``valid.jsonl`` ({"path": "dist/rel", "package", "text"} per file) and
    ``manifest.json`` to ``out_dir`` (temporary names, renamed at the end, the manifest last).
    ``recall_share``: the share of training files that carry recall drills (data/recall.py; never a
    held-out file)."""
    if not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction={valid_fraction} must be between 0 and 1")
    if not 0 <= recall_share <= 1:
        raise DataError(f"recall_share={recall_share} must be between 0 and 1")
    dists = distributions(exclude, packages)
    if not dists:
        raise DataError(f"no installed distribution with Python files on sys.path ({sys.prefix}); install some packages")
    candidates = sorted(((_sample_key(d["name"], rel), i, rel) for i, d in enumerate(dists) for rel in d["files"]))
    skipped: Dict[str, int] = {}
    seen_content: set = set()
    chosen: List[Tuple[int, str, str, str, bytes]] = []  # (dist index, rel, text, split, content SHA-256)
    used = 0
    for _, i, rel in candidates:
        if max_bytes is not None and used >= max_bytes:
            break
        path = os.path.join(dists[i]["root"], rel)
        try:
            size = os.path.getsize(path)
        except OSError:
            skipped["missing"] = skipped.get("missing", 0) + 1
            continue
        if size > max_file_bytes:
            skipped["too_large"] = skipped.get("too_large", 0) + 1
            continue
        text, reason = _read(path)
        if text is None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        data = text.encode("utf-8")
        digest = hashlib.sha256(data).digest()
        if digest in seen_content:
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        seen_content.add(digest)
        chosen.append((i, rel, text, split_of_content(digest, valid_fraction), digest))
        used += len(data)
    chosen.sort(key=lambda c: (c[0], c[1]))
    return _write(out_dir, dists, chosen, skipped, valid_fraction, max_bytes, max_file_bytes, recall_share)


def _write(out_dir, dists, chosen, skipped, valid_fraction, max_bytes, max_file_bytes, recall_share=0.0) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    stats = {s: {"files": 0, "chars": 0, "bytes": 0} for s in SPLITS}
    per_pkg = [{"name": d["name"], "version": d["version"], "files_listed": len(d["files"]),
                **{f"{s}_{k}": 0 for s in SPLITS for k in ("files", "bytes")}} for d in dists]
    digests = {s: hashlib.sha256() for s in SPLITS}
    drilled = {"files": 0, "drills": 0}
    tmp = {s: os.path.join(out_dir, f"{s}.jsonl.tmp{os.getpid()}") for s in SPLITS}
    try:
        with open(tmp["train"], "w", encoding="utf-8") as tr, open(tmp["valid"], "w", encoding="utf-8") as va:
            handles = {"train": tr, "valid": va}
            for i, rel, text, s, digest in chosen:
                path = f"{dists[i]['name']}/{rel}"
                if s == "train" and recall_share > 0 and recall.is_drilled(digest, recall_share):
                    text, n = recall.drill(text, digest)
                    drilled["files"] += n > 0
                    drilled["drills"] += n
                    digest = hashlib.sha256(text.encode("utf-8")).digest()  # the file as written
                handles[s].write(json.dumps({"path": path, "package": dists[i]["name"], "text": text}, ensure_ascii=False) + "\n")
                data = text.encode("utf-8")
                st = stats[s]
                st["files"] += 1
                st["chars"] += len(text)
                st["bytes"] += len(data)
                per_pkg[i][f"{s}_files"] += 1
                per_pkg[i][f"{s}_bytes"] += len(data)
                digests[s].update(path.encode("utf-8") + b"\0" + digest)
        if stats["train"]["files"] == 0 or stats["valid"]["files"] == 0:
            raise DataError(f"the package corpus has {stats['train']['files']} train and {stats['valid']['files']} held-out files; "
                              "both must be non-empty (raise max_bytes or valid_fraction)")
        for s in SPLITS:
            os.replace(tmp[s], os.path.join(out_dir, f"{s}.jsonl"))
    finally:
        for s in SPLITS:
            if os.path.exists(tmp[s]):
                os.remove(tmp[s])
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": "Python sources (*.py) of the installed distributions (importlib.metadata RECORD)",
        "interpreter": interpreter(),
        "excluded_distributions": sorted(EXCLUDED_DISTRIBUTIONS),
        "max_bytes": max_bytes,
        "max_file_bytes": max_file_bytes,
        "valid_fraction": valid_fraction,
        "split_rule": "valid iff int.from_bytes(sha256(text).digest()[:8], 'big') % 10000 < round(valid_fraction * 10000)",
        "dedup": "by SHA-256 of the text; the first copy in sampling order (sha256 of dist/path) is kept",
        "skipped": dict(sorted(skipped.items())),
        "recall_drills": {"share_of_train_files": recall_share, "lines_per_drill": recall.LINES_PER_DRILL, **drilled,
                          "line": recall.key_line("KEY_" + "d" * recall.NAME_DIGITS, "d" * recall.KEY_DIGITS).strip(),
                          "rule": "train files only, chosen by content SHA-256 bytes 8..16 (data/recall.py); each drill is one key line "
                                  "inserted twice, the repeat a log-uniform number of lines further down"},
        "packages": [p for p in per_pkg if p["train_files"] + p["valid_files"] > 0],
        "splits": {s: {**stats[s], "sha256": digests[s].hexdigest()} for s in SPLITS},
    }
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def add_token_counts(corpus_dir: str, prefixes: Dict[str, str]) -> dict:
    """Per-package token counts into the manifest, from the datasets preprocess_data.py wrote of
    each split (one document per file, in the jsonl's order: document i is line i)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = os.path.join(corpus_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    tokens: Dict[str, Dict[str, int]] = {}
    for s in SPLITS:
        ds = IndexedDataset(prefixes[s], mmap=True)
        lengths = [int(n) for n in ds.sequence_lengths]  # copied while the mmap is open (it closes with ds)
        del ds
        with open(os.path.join(corpus_dir, f"{s}.jsonl"), encoding="utf-8") as f:
            pkgs = [json.loads(line)["package"] for line in f]
        if len(pkgs) != len(lengths):
            raise DataError(f"{prefixes[s]} holds {len(lengths)} documents but {s}.jsonl {len(pkgs)} files; rebuild the datasets")
        for pkg, n in zip(pkgs, lengths):
            tokens.setdefault(pkg, {"train": 0, "valid": 0})[s] += n
        manifest["splits"][s]["tokens"] = sum(lengths)
    for p in manifest["packages"]:
        t = tokens.get(p["name"], {"train": 0, "valid": 0})
        p["train_tokens"], p["valid_tokens"] = t["train"], t["valid"]
    _write_json(path, manifest)
    return manifest
