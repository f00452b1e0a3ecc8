"""Attention for the engine: a decode step over a static cache, and the causal prefill.

Decode (``cached_attention``): the query heads that share a key head are one matrix of queries
against that head's cache -- [b, kv_heads, group, d] x [b, kv_heads, n, d] -- so each cached key
and value is read once per step, as serving kernels do; MLA passes its latent as one key head
shared by every query head. The cache is static ([.., n, ..] allocated for the whole decode), so
the slots not written yet are masked: valid are the slots <= ``pos``, a one-element device tensor
(nothing in a step depends on a host value). Scores and softmax are fp32. On a GPU the step runs
attention/decode_triton.py's one-pass kernel; the matmul path below is the reference it is tested
against and the CPU's path (``kernel`` picks one: bench_decode --attention-kernel).

Sinks (GateSWA): one logit per head, a virtual key whose value is zero -- the softmax denominator
gains exp(sink), which is logaddexp(logsumexp(scores), sink) in the normaliser and nothing else.

Prefill (``causal_attention``): queries and keys of the same positions. Plain causal attention
goes to torch's scaled_dot_product_attention (flash or cuDNN on a GPU); a window or sinks go to
attention/band.py's decomposition into causal blocks (cuDNN / flash kernels on a GPU, its fp32
reference on the CPU), which composes the sinks from the kernels' log-sum-exp.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_attnedit.attention import band, decode_triton
from megatron_attnedit.errors import EvalError


KERNELS = ("auto", "triton", "matmul")  # decode attention: auto = triton where it runs, else matmul


def cached_attention(q, k, v, pos, scale: float, sinks: Optional[torch.Tensor] = None, kernel: str = "auto") -> Tuple[torch.Tensor, str]:
    """q [b, kv_heads, group, d], k [b, kv_heads, n, d], v [b, kv_heads, n, dv], pos: one-element
    device tensor (slots <= pos hold keys), sinks [kv_heads * group] or None -> ([b, kv_heads, group,
    dv], the kernel that ran: "triton" (attention/decode_triton.py, one pass) or "matmul")."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown decode attention kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    if kernel != "matmul" and decode_triton.usable(q, k, v):
        return decode_triton.decode_attention(q, k, v, pos, scale, sinks), "triton"
    if kernel == "triton":
        raise EvalError(
            f"the Triton decode kernel cannot run here ({'no Triton' if decode_triton.triton is None else 'CPU tensors' if not q.is_cuda else 'head sizes ' + str((q.shape[-1], v.shape[-1]))}); "
            "use the matmul kernel"
        )
    valid = torch.arange(k.shape[2], device=k.device) <= pos
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    if sinks is None:
        p = torch.softmax(scores, dim=-1)
    else:
        norm = torch.logaddexp(torch.logsumexp(scores, dim=-1, keepdim=True), sinks.float().view(1, *scores.shape[1:3], 1))
        p = torch.exp(scores - norm)
    return torch.matmul(p.to(v.dtype), v), "matmul"


def _band_kernel(q: torch.Tensor, dv: int) -> str:
    for kernel in ("cudnn", "flash"):
        if band.usable(kernel, q, dv):
            return kernel
    return "math"


def causal_attention(q, k, v, scale: float, window: Optional[int] = None, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [b, h, s, d], k [b, kv_heads, s, d], v [b, kv_heads, s, dv] -> [b, h, s, dv]; query i sees
    keys i - window < j <= i (every j <= i without a window)."""
    s = q.shape[2]
    if window is not None and window >= s:
        window = None  # nothing lies beyond the window yet
    if window is None and sinks is None:
        dv = v.shape[-1]
        if q.is_cuda and dv != q.shape[-1]:  # flash kernels want one head size: pad the values (MLA: 192 vs 128)
            v = F.pad(v, (0, q.shape[-1] - dv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return out[..., :dv]
    if window is not None and window < 2:
        raise ValueError(f"a sliding window of {window} key cannot be computed by the band decomposition; use a window of 2 or more")
    return band.band_attention(q, k, v, scale, window, sinks, kernel=_band_kernel(q, v.shape[-1]))
