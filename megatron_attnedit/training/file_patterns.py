"""File patterns as users give them on a command line (``--input``, ``--data``)."""

from __future__ import annotations

import glob
import os
from typing import Callable, List


def expand(patterns: List[str], no_match: Callable[[str], Exception]) -> List[str]:
    """The files the patterns match (globs, ``**`` recursive), sorted within each pattern, each file
    once, in the order first matched; raises ``no_match(pattern)`` for a pattern matching no file."""
    files: List[str] = []
    for pat in patterns:
        hits = sorted(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f))
        if not hits:
            raise no_match(pat)
        files += hits
    return list(dict.fromkeys(files))
