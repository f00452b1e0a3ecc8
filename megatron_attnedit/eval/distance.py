"""Loss by token position in the scoring window, teacher and students on the same tokens.

The perplexity pass (eval/perplexity.py) sums every scored token's NLL by its position in the
window; here those sums are grouped into buckets of *context*: the number of tokens a prediction
is conditioned on (position in the window + 1). Buckets are (2^(k-1), 2^k] up to the window
length -- 1, 2, 3-4, 5-8, ... -- with each sliding window W below the window length added as a
bucket edge, so the predictions that see more than W tokens (where a sliding layer has dropped
some) are exactly the buckets above W.

For each student with sliding layers: its mean loss on the predictions with context > W, and the
teacher's on the same predictions; and the same within W, for reference.
"""

from __future__ import annotations

from typing import Dict, List, Optional


def edges(seq_len: int, windows: List[int]) -> List[int]:
    """Upper ends (inclusive) of the buckets: powers of two below ``seq_len``, ``seq_len``, and
    every window in (1, seq_len)."""
    out = {seq_len} | {2**k for k in range(0, 31) if 2**k < seq_len} | {w for w in windows if 1 < w < seq_len}
    return sorted(out)


def label(lo: int, hi: int) -> str:
    return str(hi) if hi == lo + 1 else f"{lo + 1}-{hi}"


def _mean(s: List[float], c: List[int], lo: int, hi: int) -> dict:
    """Mean NLL of the predictions with context in (lo, hi] (positions lo .. hi - 1)."""
    n = sum(c[lo:hi])
    return dict(tokens=n, mean_nll=(sum(s[lo:hi]) / n) if n else None)


def buckets(position_nll: dict, bucket_edges: List[int]) -> List[dict]:
    s, c = position_nll["sum"], position_nll["count"]
    out, lo = [], 0
    for hi in bucket_edges:
        out.append(dict(lo=lo, hi=hi, label=label(lo, hi), **_mean(s, c, lo, hi)))
        lo = hi
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def compare(models: List[dict], windows: Dict[str, int], seq_len: int) -> dict:
    """``models``: dicts with ``name``, ``role`` and ``position_nll`` (the teacher first);
    ``windows``: sliding window per student name (students without one absent). Returns the
    buckets per model (students with their loss / the teacher's) and the beyond-window figures."""
    teacher = models[0]
    e = edges(seq_len, [w for w in windows.values()])
    t_buckets = buckets(teacher["position_nll"], e)
    per_model = {}
    for m in models:
        rows = buckets(m["position_nll"], e)
        for r, t in zip(rows, t_buckets):
            r["ratio"] = _ratio(r["mean_nll"], t["mean_nll"])
        per_model[m["name"]] = rows
    beyond = {}
    for m in models[1:]:
        w = windows.get(m["name"])
        if w is None or w >= seq_len:
            continue
        s, c = m["position_nll"]["sum"], m["position_nll"]["count"]
        ts, tc = teacher["position_nll"]["sum"], teacher["position_nll"]["count"]
        out, inside = _mean(s, c, w, seq_len), _mean(s, c, 0, w)
        t_out, t_inside = _mean(ts, tc, w, seq_len), _mean(ts, tc, 0, w)
        beyond[m["name"]] = dict(
            window=w, tokens=out["tokens"], student_nll=out["mean_nll"], teacher_nll=t_out["mean_nll"],
            ratio=_ratio(out["mean_nll"], t_out["mean_nll"]),
            within=dict(tokens=inside["tokens"], student_nll=inside["mean_nll"], teacher_nll=t_inside["mean_nll"],
                        ratio=_ratio(inside["mean_nll"], t_inside["mean_nll"])),
        )
    return dict(seq_len=seq_len, edges=e, windows=dict(windows), models=per_model, beyond_window=beyond)
