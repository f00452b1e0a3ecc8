"""Recall drills: key lines stated in a training file and stated again further down.

A model learns to copy from far back in its context (what an induction head does) only from text
that rewards it. Library code rewards it weakly -- a name defined at the top of a file and used
again below -- and the scale study's teacher, 82M parameters trained for three minutes on it, did
not learn to: its exact recall in the retrieval probe (eval/retrieval.py) was 0 at every distance.
So the study's training files can carry drills: in a share of them, lines of the form ::

    KEY_4821 = "73915"

inserted between two lines of the file, and the same line inserted again some lines later. The
second copy's value is only predictable by looking back at the first: the loss on it teaches
recall over the distance between them. Names (4 digits) and values (5 digits) are random per
drill, so nothing about a value can be memorised, only copied.

The drills use the probe's key-line format -- the probe asks whether a model can do this -- but
never its contexts: drills go into training files only, held-out files are never drilled (the
held-out perplexity is on the files as they are, and the probe's filler is held-out code), and the
draws come from a generator seeded by the file's own content, not the probe's seed.

Gaps between a statement and its repeat are drawn log-uniformly between 1 line and the rest of
the file, so short and long distances are drilled alike (a uniform draw would favour short gaps).
"""

from __future__ import annotations

import hashlib
import math
from typing import List, Tuple

import numpy as np

NAME_DIGITS, KEY_DIGITS = 4, 5
NAME_PREFIX = "KEY_"
LINES_PER_DRILL = 40
"""One drill per this many lines of a drilled file (at least one): ~10 drills per 4096-token
sequence of library code (~10 tokens per line), each adding two lines."""


def key_line(name: str, key: str) -> str:
    """The statement both the drills and the probe use: ``KEY_4821 = "73915"`` and a line break."""
    return f'{name} = "{key}"\n'


def random_name_key(rng: np.random.Generator) -> Tuple[str, str]:
    digits = list("0123456789")
    return NAME_PREFIX + "".join(rng.choice(digits, NAME_DIGITS)), "".join(rng.choice(digits, KEY_DIGITS))


def is_drilled(digest: bytes, share: float) -> bool:
    """Whether the file with content SHA-256 ``digest`` carries drills: a share of the files, chosen
    by content (bytes 8..16 of the digest: independent of the train/held-out split, which reads 0..8)."""
    return int.from_bytes(digest[8:16], "big") % 10000 < round(share * 10000)


def drill(text: str, digest: bytes, lines_per_drill: int = LINES_PER_DRILL) -> Tuple[str, int]:
    """``text`` with its drills inserted, and how many. Deterministic in the file's content."""
    parts = text.split("\n")  # not splitlines(): a form feed or U+2028 inside a line is not a line break here
    if parts[-1] == "":
        parts.pop()
    lines = [p + "\n" for p in parts]  # a last line without its break gets one
    n_lines = len(lines)
    if n_lines < 2:
        return text, 0
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(b"recall-drill\0" + digest).digest()[:8], "big"))
    inserts: List[Tuple[int, int, str]] = []  # (insert before line i, order, line)
    names = set()
    for k in range(max(1, n_lines // lines_per_drill)):
        first = int(rng.integers(0, n_lines))
        room = n_lines - first  # the repeat goes before one of lines first+1 .. n_lines (n_lines: at the end)
        gap = min(room, max(1, int(math.exp(rng.uniform(0.0, math.log(room + 1))))))
        name, key = random_name_key(rng)
        while name in names:  # one value per name in a file: a repeat has exactly one answer
            name, key = random_name_key(rng)
        names.add(name)
        line = key_line(name, key)
        inserts += [(first, 2 * k, line), (first + gap, 2 * k + 1, line)]
    inserts.sort()
    out, j = [], 0
    for i, line in enumerate(lines + [""]):
        while j < len(inserts) and inserts[j][0] == i:
            out.append(inserts[j][2])
            j += 1
        out.append(line)
    return "".join(out), len(inserts) // 2
