"""Retrieval probe: can the model copy a key stated far back in its context?

Each trial is one context of exactly ``context`` tokens of real held-out code with one line
inserted, and a question at the end::

    <held-out lines>
    KEY_4821 = "73915"
    <held-out lines>
    KEY_4821 = "

The model completes the last line greedily. The question repeats the statement's tokens up to
the value (``assert KEY_4821 == "`` would not: the tokenizer splits the name differently after
``assert``), so a model that can copy from its context -- what an induction head does -- can
answer, and one that cannot see the statement cannot: name (4 digits) and value (5 digits) are
random per trial, chance is 10^-5 for the whole value and 1/10 per character. The filler is whole lines of the evaluation data,
consecutive within one document, chosen per trial; spans are picked so that every context has
the same length and the *distance* -- tokens from the value's first token to the question's last
token, i.e. how far back the last position must look -- is exact. All prompts have the same
length, so only the key's depth changes with distance. A fixed seed makes the trials the same for
every model and every run.

Scored: exact match (the key's characters, then the closing quote) and per-character accuracy of
the first ``len(key)`` generated characters, per distance. Generation is greedy with the model's
own cache (``generate``), all trials of a batch at once (same length, no padding).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np

from megatron_attnedit.errors import EvalError

from megatron_attnedit.data.recall import KEY_DIGITS, key_line, random_name_key  # the drills' format (training)

CHANCE = dict(exact=10.0**-KEY_DIGITS, per_char=0.1)
MIN_MARGIN = 24  # the key line's tail and the question take ~20 tokens: distances below this do not fit


@dataclasses.dataclass
class Trial:
    ids: np.ndarray  # the prompt, ``context`` token ids
    key: str
    name: str
    distance: int  # last prompt position - position of the key's first token


def default_distances(context: int, windows: List[int]) -> List[int]:
    """Powers of two from 32 up to the context, 3/4 of the context, and for each sliding window W
    (smaller than the context) W/2 and 3W/2 -- distances on both sides of every window."""
    out = {d for d in (2**k for k in range(5, 20)) if d <= context - MIN_MARGIN}
    out.add(3 * context // 4)
    for w in windows:
        out |= {d for d in (w // 2, 3 * w // 2) if w < context}
    return sorted(d for d in out if MIN_MARGIN <= d <= context - MIN_MARGIN)


def check_distances(distances: List[int], context: int) -> None:
    bad = [d for d in distances if not MIN_MARGIN <= d <= context - MIN_MARGIN]
    if bad:
        raise EvalError(f"--probe-distances {','.join(map(str, bad))}: each must be in [{MIN_MARGIN}, --probe-context - {MIN_MARGIN} = "
                        f"{context - MIN_MARGIN}] (the key line and the question take ~20 tokens)")


class _Lines:
    """Spans of whole lines within one document of the evaluation tokens, by exact length."""

    def __init__(self, tokens: np.ndarray, eod: int, decode):
        self.tokens = tokens
        ids, inverse = np.unique(tokens, return_inverse=True)
        ends = np.asarray([decode([int(t)]).endswith("\n") or int(t) == eod for t in ids])[inverse]  # a line (or document) ends here
        self.starts = np.concatenate([[0], np.flatnonzero(ends[:-1]) + 1]).astype(np.int64)
        self.doc = np.cumsum(tokens == eod)  # document index after position i (an eod closes its document)

    def span(self, n: int, rng: np.random.Generator) -> Optional[np.ndarray]:
        """A random run of whole lines, exactly ``n`` tokens, no end-of-document inside; None if none."""
        if n == 0:
            return self.tokens[:0]
        s = self.starts[np.isin(self.starts + n, self.starts)]
        # no end-of-document among tokens[s : s + n]: the eod count before s equals the one before s + n
        before = np.where(s > 0, self.doc[np.maximum(s - 1, 0)], 0)
        s = s[self.doc[s + n - 1] == before]
        if len(s) == 0:
            return None
        p = int(rng.choice(s))
        return self.tokens[p : p + n]


def build_trials(tokens: np.ndarray, eod: int, encode, decode, context: int, distances: List[int], trials: int, seed: int) -> List[Trial]:
    """``trials`` prompts per distance (see the module docstring). ``encode(text) -> ids`` and
    ``decode(ids) -> text`` are the teacher tokenizer's."""
    check_distances(distances, context)
    sample = key_line("KEY_0123", "45678")
    if decode(encode(sample)) != sample:
        raise EvalError(f"the teacher's tokenizer does not reproduce the probe's key line ({sample.strip()!r} decodes to "
                        f"{decode(encode(sample)).strip()!r}); the retrieval probe needs digits, quotes and line breaks")
    lines = _Lines(np.asarray(tokens, dtype=np.int64), eod, decode)
    rng = np.random.default_rng(seed)
    out = []
    for d in distances:
        for _ in range(trials):
            for _attempt in range(20):
                name, key = random_name_key(rng)
                line = key_line(name, key)
                cut = line.index('"') + 1
                head, tail = encode(line[:cut]), encode(line[cut:])
                question = head  # the statement again, up to the value
                if encode(line) != head + tail:
                    continue  # the tokenizer merges across the quote for this key: draw another
                a = context - 1 - d - len(head)  # filler before the key line
                b = context - a - len(head) - len(tail) - len(question)  # filler between it and the question
                if a < 0 or b < 0:
                    continue
                before, between = lines.span(a, rng), lines.span(b, rng)
                if before is None or between is None:
                    continue
                ids = np.concatenate([before, head, tail, between, question]).astype(np.int64)
                out.append(Trial(ids=ids, key=key, name=name, distance=d))
                break
            else:
                raise EvalError(f"the evaluation data has no run of whole lines to fill a {context}-token probe context at distance {d}; "
                                "give more --data, a shorter --probe-context, or --probe-trials 0 to skip the probe")
    return out


def score(answer: str, key: str) -> Dict[str, float]:
    """Exact: the key's characters then the closing quote (or nothing more generated); per
    character: matches among the first len(key) characters."""
    exact = answer[: len(key)] == key and answer[len(key) : len(key) + 1] in ("", '"')
    per_char = sum(a == b for a, b in zip(answer, key)) / len(key)
    return dict(exact=float(exact), per_char=per_char)


NEW_TOKENS = KEY_DIGITS + 1  # enough for the value and its closing quote (a token holds >= 1 character)


def hf_completer(model, device):
    """``complete(ids [B, T] int64 tensor, n) -> [B, n]`` greedy new tokens of a Hugging Face causal
    LM, with its own cache (``generate``); the prompts of a batch have one length, so no padding."""
    import torch

    def complete(ids, n):
        ids = ids.to(device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        return gen[:, ids.shape[1] :].cpu()

    return complete


def run(complete, trials: List[Trial], decode, batch_size: int = 16) -> dict:
    """Per distance: trials, exact-match and per-character accuracy; plus each trial's answer.
    ``complete``: see :func:`hf_completer`."""
    import time

    import torch

    t0 = time.perf_counter()
    answers = []
    for i in range(0, len(trials), batch_size):
        ids = torch.from_numpy(np.stack([t.ids for t in trials[i : i + batch_size]]))
        answers += [decode([int(x) for x in row]) for row in complete(ids, NEW_TOKENS)]
    by_d: Dict[int, List[dict]] = {}
    rows = []
    for t, ans in zip(trials, answers):
        s = score(ans, t.key)
        by_d.setdefault(t.distance, []).append(s)
        rows.append(dict(distance=t.distance, name=t.name, key=t.key, answer=ans, **s))
    per_distance = [dict(distance=d, trials=len(v), exact=float(np.mean([s["exact"] for s in v])),
                         per_char=float(np.mean([s["per_char"] for s in v]))) for d, v in sorted(by_d.items())]
    return dict(per_distance=per_distance, trials=rows, seconds=time.perf_counter() - t0)
