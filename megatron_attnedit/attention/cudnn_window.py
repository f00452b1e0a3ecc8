"""Sliding-window (and sink) attention on cuDNN's own diagonal-band kernel.

cuDNN's fused attention takes a diagonal band -- query i sees keys i-W < j <= i -- and skips the
tiles outside it, forward and backward. torch does not expose that option; the cuDNN frontend
does, as the torch ops ``torch.ops.cudnn.sdpa_fwd`` / ``sdpa_bwd`` (optional:
``pip install --no-deps 'nvidia-cudnn-frontend>=1.32,<2'`` -- its graph API needs none of the
package's dependencies; measured with 1.32.0 and the cuDNN 9.19 of torch 2.11+cu130). At 32K
tokens, W = 4096, 32 heads of 128 on an H100 it takes 14.8 ms fwd+bwd against 54.5 ms for SDPA's
full causal kernel (3.68x) and 18.2 ms for FlexAttention's block-sparse window
(``python launch/bench_attention.py --sweep quick``,
``launch/results/bench_attention_32k_cudnn_window_h100.json``).

The frontend's ``window_left`` is cuDNN's ``diagonal_band_left_bound``: the number of keys a
query sees *including itself*, i.e. our W (measured against a dense-mask reference on the GPU:
W matches to bf16 rounding, W - 1 does not).

Sinks (one learnable logit per head: a virtual key with value zero) are not given to the kernel
-- the frontend has no sink backward -- but composed from its log-sum-exp as ``band.py`` does: the
sink-normalised output is out * sigmoid(lse - sink), and the kernel backward run with that output
and lse' = logaddexp(lse, sink) yields the exact gradients of the sink-normalised attention
(p = exp(s - lse') are the real probabilities, rowsum(dO * O) the real correction term); the
sink's own gradient is -sum_i p_sink_i * rowsum(dO_i * O_i).

The kernel is pluggable (``Kernel``): ``cudnn`` on the GPU, ``math`` -- a dense fp32 reference of
the same fwd/bwd contract -- so the composition is tested on the CPU. Imports only torch.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch


class Kernel(NamedTuple):
    name: str
    # fwd(q, k, v, scale, window) -> (out [b, h, s, dv], lse [b, h, s, 1] fp32); window None = causal
    fwd: Callable
    # bwd(dout, q, k, v, out, lse, scale, window) -> (dq, dk, dv)
    bwd: Callable


def _cudnn_ops():
    from cudnn.sdpa.fwd import torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd)

    return torch.ops.cudnn


def _band(window: Optional[int]) -> int:
    return -1 if window is None else int(window)


def _cudnn_fwd(q, k, v, scale, window):
    out, lse = _cudnn_ops().sdpa_fwd(q, k, v, scale, is_causal=True, window_left=_band(window), return_lse=True)
    return out, lse.reshape(q.shape[0], q.shape[1], q.shape[2], 1)


def _cudnn_bwd(dout, q, k, v, out, lse, scale, window):
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    return _cudnn_ops().sdpa_bwd(dout, q, k, v, out, lse, scale, is_causal=True, window_left=_band(window))


def _math_probs(q, k, lse, scale, window):
    """exp(scores - lse) over the allowed keys, fp32, with GQA key heads repeated."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1) if g > 1 else k
    s = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scale
    n = q.shape[2]
    i = torch.arange(n, device=q.device).unsqueeze(1)
    j = torch.arange(n, device=q.device).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    s = s.masked_fill(~allowed, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.exp(s - lse), lse


def _math_fwd(q, k, v, scale, window):
    p, lse = _math_probs(q, k, None, scale, window)
    g = q.shape[1] // v.shape[1]
    vv = v.repeat_interleave(g, dim=1) if g > 1 else v
    return torch.matmul(p, vv.float()).to(q.dtype), lse


def _math_bwd(dout, q, k, v, out, lse, scale, window):
    g = q.shape[1] // k.shape[1]
    p, _ = _math_probs(q, k, lse.float(), scale, window)
    kk = k.repeat_interleave(g, dim=1) if g > 1 else k
    vv = v.repeat_interleave(g, dim=1) if g > 1 else v
    do = dout.float()
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, vv.float().transpose(-1, -2)) - (do * out.float()).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kk.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    if g > 1:
        dk, dv = dk.unflatten(1, (-1, g)).sum(2), dv.unflatten(1, (-1, g)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


KERNELS = {"cudnn": Kernel("cudnn", _cudnn_fwd, _cudnn_bwd), "math": Kernel("math", _math_fwd, _math_bwd)}


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, scale: float, window: Optional[int], kernel: Kernel):
        out, lse = kernel.fwd(q, k, v, scale, window)
        lse = lse.float()
        if sink is not None:
            total = torch.logaddexp(lse, sink.float().view(1, -1, 1, 1))
            out = (out.float() * torch.exp(lse - total)).to(out.dtype)
            lse = total
        ctx.scale, ctx.window, ctx.kernel, ctx.has_sink = scale, window, kernel, sink is not None
        ctx.save_for_backward(q, k, v, out, lse, *([sink] if sink is not None else []))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.bwd(dout, q, k, v, out, lse, ctx.scale, ctx.window)
        dsink = None
        if ctx.has_sink:
            sink = rest[0]
            p_sink = torch.exp(sink.float().view(1, -1, 1, 1) - lse)  # [b, h, s, 1]
            rows = (dout.float() * out.float()).sum(-1, keepdim=True)
            dsink = -(p_sink * rows).sum((0, 2, 3)).to(sink.dtype)
        return dq, dk, dv, dsink, None, None, None


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: Optional[int],
    sink: Optional[torch.Tensor] = None,
    kernel: str = "cudnn",
) -> torch.Tensor:
    """Causal attention on [b, h, s, d] tensors (as many keys as queries, GQA allowed), restricted
    to a window of W keys when ``window`` is set (None or W >= s: full causal), with optional
    per-head sink logits [h]. Returns [b, h, s, dv]."""
    s = q.shape[2]
    if k.shape[2] != s:
        raise ValueError(f"window_attention needs as many keys as queries (got {s} and {k.shape[2]})")
    if window is not None and window >= s:
        window = None
    return _WindowAttention.apply(q, k, v, sink, scale, window, KERNELS[kernel])


_PROBED: dict = {}


def usable(q: torch.Tensor, dv: int) -> bool:
    """Whether the cuDNN frontend is installed and its band kernel runs here for this dtype and
    head size, forward and backward (probed once per combination on a small problem, and checked
    against the math kernel so that a frontend with another window convention is never used)."""
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (q.device.index, q.dtype, q.shape[-1], dv)
    if key not in _PROBED:
        _PROBED[key] = _probe(q.device, q.dtype, q.shape[-1], dv)
    return _PROBED[key]


def _probe(device, dtype, dk: int, dv: int) -> bool:
    try:
        _cudnn_ops()
    except Exception:  # not installed, or installed without a usable cuDNN: the other kernels run
        return False
    # The first call may come from an evaluation under no_grad / inference_mode: probe the
    # backward regardless, or the answer would be "no" for the rest of the process.
    with torch.inference_mode(False), torch.enable_grad():
        try:
            g = torch.Generator(device=device).manual_seed(0)
            t = lambda d: torch.randn(1, 2, 256, d, device=device, dtype=dtype, generator=g).requires_grad_()  # noqa: E731
            q, k, v = t(dk), t(dk), t(dv)
            scale = 1.0 / math.sqrt(dk)
            got = window_attention(q, k, v, scale, 64)
            got.float().square().sum().backward()
            ref_out, _ = _math_fwd(q.detach(), k.detach(), v.detach(), scale, 64)
            return (got.float() - ref_out.float()).abs().max().item() < 0.05 and q.grad is not None
        except (RuntimeError, NotImplementedError, ValueError):
            return False
