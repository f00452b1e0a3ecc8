"""Sliding-window (and sink) attention built from causal flash kernels that return their log-sum-exp.

A window of W keys (query i sees keys i-W < j <= i) over a sequence cut into chunks of W tokens
needs, for the queries of chunk c, the keys of chunk c (a causal W x W block) and those of chunk
c-1 above the diagonal (key offset b > query offset a). Reversing both index ranges turns that
second block into a causal (W-1) x (W-1) block: query W-1-a'' ... 0 against key W-1 ... 1. So two
batched calls of a causal kernel (all diagonal blocks in one, all off-diagonal ones in the other)
compute exactly the window's score pairs, and the two partial results are merged through their
log-sum-exps. This lets the fastest causal kernel on the device (cuDNN's on H100, 1.4x
FlexAttention's causal kernel at 32K) do sliding-window attention.

The backward runs each causal kernel's own backward with the *merged* output and log-sum-exp, as
ring attention does: the softmax probabilities exp(s - lse) and the rowsum(dO * O) term are those of
the whole row, so each block's gradient is exact.

Learnable sinks (one logit per head, a virtual key whose value is zero) are one more term in the
merged log-sum-exp and nothing else: out = sum_j exp(s_j - lse') v_j with lse' including the sink,
which is the kernel output scaled by sigmoid(lse - sink). Passing lse' and that scaled output to the
kernel backward gives the gradients of the sink-normalised attention (the sink's own gradient is
-sum_i p_sink_i * rowsum(dO_i * O_i), computed here).

Layouts: [b, h, s, d] views of megatron's [s, b, h, d] memory are regrouped without a copy into
[chunks, b*h, W, d] (batch and heads folded; GQA grouping survives the fold because the key heads
fold the same way). Only queries, keys and values with sq == sk go through here.

Kernels: ``cudnn`` (``aten._scaled_dot_product_cudnn_attention``), ``flash`` (torch's
FlashAttention-2 op) and ``math`` (fp32 reference on any device; the tests run the decomposition
with it on the CPU). Imports only torch.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch


class Kernel(NamedTuple):
    name: str
    # fwd(q, k, v, scale) -> (out, lse, aux); q [N, H, L, d], k/v [N, Hk, L, d]; lse any shape of N*H*L
    fwd: Callable
    # bwd(dout, q, k, v, out, lse, aux, scale) -> (dq, dk, dv)
    bwd: Callable
    gqa: bool  # takes fewer key/value heads than query heads


def _cudnn_fwd(q, k, v, scale):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    return r[0], r[1], r


def _cudnn_bwd(do, q, k, v, out, lse, aux, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse, aux[6], aux[7], None, aux[2], aux[3], aux[4], aux[5], 0.0, True, scale=scale
    )


def _flash_fwd(q, k, v, scale):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return r[0], r[1], r


def _flash_bwd(do, q, k, v, out, lse, aux, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, aux[2], aux[3], aux[4], aux[5], 0.0, True, aux[6], aux[7], scale=scale
    )


def _math_scores(q, k, scale):
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~causal, float("-inf"))


def _math_fwd(q, k, v, scale):
    s = _math_scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)
    vv = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1) if v.shape[1] != q.shape[1] else v
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vv.float())
    return out.to(q.dtype), lse, None


def _math_bwd(do, q, k, v, out, lse, aux, scale):
    g = q.shape[1] // k.shape[1]
    p = torch.exp(_math_scores(q, k, scale) - lse.float().unsqueeze(-1))
    vv = v.repeat_interleave(g, dim=1) if g > 1 else v
    kk = k.repeat_interleave(g, dim=1) if g > 1 else k
    do32 = do.float()
    dv = torch.matmul(p.transpose(-1, -2), do32)
    dp = torch.matmul(do32, vv.float().transpose(-1, -2))
    ds = p * (dp - (do32 * out.float()).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kk.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    if g > 1:
        dk = dk.unflatten(1, (-1, g)).sum(2)
        dv = dv.unflatten(1, (-1, g)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


KERNELS = {
    "cudnn": Kernel("cudnn", _cudnn_fwd, _cudnn_bwd, gqa=False),
    "flash": Kernel("flash", _flash_fwd, _flash_bwd, gqa=False),
    "math": Kernel("math", _math_fwd, _math_bwd, gqa=True),
}


def _chunks(x: torch.Tensor, w: int, n: int) -> torch.Tensor:
    """[b, h, s, d] -> [n, b*h, w, d], zero-padded at the end to n*w tokens (a view when x is a
    [b, h, s, d] view of [s, b, h, d] memory and s == n*w)."""
    b, h, s, d = x.shape
    t = x.permute(2, 0, 1, 3)  # [s, b, h, d]
    if n * w != s:
        t = torch.cat([t, t.new_zeros(n * w - s, b, h, d)])
    return t.reshape(n, w, b * h, d).transpose(1, 2)


def _unchunk(x: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """[n, b*h, w, d] -> [b, h, s, d] (inverse of ``_chunks``, padding dropped)."""
    n, bh, w, d = x.shape
    t = x.transpose(1, 2).reshape(n * w, b, bh // b, d)[:s]
    return t.permute(1, 2, 0, 3)


def _chunk_empty(n, bh, w, d, like: torch.Tensor) -> torch.Tensor:
    """An [n, bh, w, d] tensor laid out as [n, w, bh, d] (so ``_unchunk`` is a view)."""
    return torch.empty(n, w, bh, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def _lse3(lse: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    return lse.reshape(n, h, w).float()


def _sink_logits(sink: torch.Tensor, b: int) -> torch.Tensor:
    """Per-head sink logits [h] as fp32 rows of the folded [.., b*h, ..] layout."""
    return sink.float().repeat(b).view(1, -1, 1)


def _as_kernel_lse(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    out.copy_(value.reshape(like.shape))
    return out


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, scale: float, window: int, kernel: Kernel):
        b, h, s, _ = q.shape
        w = window
        n = -(-s // w)
        bh, dv = b * h, v.shape[-1]
        Q, K, V = _chunks(q, w, n), _chunks(k, w, n), _chunks(v, w, n)
        o1, l1k, a1 = kernel.fwd(Q, K, V, scale)
        l1 = _lse3(l1k, n, bh, w)
        lse = l1.clone()
        off, a2 = [], None  # the off-diagonal blocks' reversed inputs and kernel LSE, for backward
        if n > 1:
            Qo, Ko, Vo = Q[1:, :, : w - 1].flip(2), K[:-1, :, 1:].flip(2), V[:-1, :, 1:].flip(2)
            o2r, l2k, a2 = kernel.fwd(Qo, Ko, Vo, scale)
            l2 = _lse3(l2k, n - 1, bh, w - 1).flip(2)
            lse[1:, :, : w - 1] = torch.logaddexp(l1[1:, :, : w - 1], l2)
            off = [Qo, Ko, Vo, l2k]
        if sink is not None:
            lse = torch.logaddexp(lse, _sink_logits(sink, b))
        acc = o1.float() * torch.exp(l1 - lse).unsqueeze(-1)
        if n > 1:
            acc[1:, :, : w - 1] += o2r.flip(2).float() * torch.exp(l2 - lse[1:, :, : w - 1]).unsqueeze(-1)
        out = _chunk_empty(n, bh, w, dv, o1)
        out.copy_(acc)
        ctx.scale, ctx.kernel, ctx.b, ctx.s, ctx.n, ctx.w = scale, kernel, b, s, n, w
        ctx.has_sink = sink is not None
        ctx.aux1, ctx.aux2 = a1, a2
        ctx.save_for_backward(Q, K, V, out, lse, l1k, *([sink] if sink is not None else []), *off)
        return _unchunk(out, b, s)

    @staticmethod
    def backward(ctx, dout):
        saved = list(ctx.saved_tensors)
        Q, K, V, out, lse, l1k = saved[:6]
        rest = saved[6:]
        sink = rest.pop(0) if ctx.has_sink else None
        kernel, scale, b, s, n, w = ctx.kernel, ctx.scale, ctx.b, ctx.s, ctx.n, ctx.w
        dO = _chunks(dout, w, n)
        dQ, dK, dV = kernel.bwd(dO, Q, K, V, out, _as_kernel_lse(lse, l1k), ctx.aux1, scale)
        if n > 1:
            Qo, Ko, Vo, l2k = rest
            dOo, Oo = dO[1:, :, : w - 1].flip(2), out[1:, :, : w - 1].flip(2)
            lo = _as_kernel_lse(lse[1:, :, : w - 1].flip(2), l2k)
            dQo, dKo, dVo = kernel.bwd(dOo, Qo, Ko, Vo, Oo, lo, ctx.aux2, scale)
            dQ[1:, :, : w - 1] += dQo.flip(2)  # the kernel's gradients are fresh tensors: add in place
            dK[:-1, :, 1:] += dKo.flip(2)
            dV[:-1, :, 1:] += dVo.flip(2)
        dsink = None
        if sink is not None:
            p_sink = torch.exp(_sink_logits(sink, b) - lse)
            rows = (dO.float() * out.float()).sum(-1)
            dsink = -(p_sink * rows).sum((0, 2)).view(b, -1).sum(0).to(sink.dtype)
        grads = [_unchunk(g, b, s) for g in (dQ, dK, dV)]
        return grads[0], grads[1], grads[2], dsink, None, None, None


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: Optional[int],
    sink: Optional[torch.Tensor] = None,
    kernel: str = "cudnn",
) -> torch.Tensor:
    """Causal attention on [b, h, s, d] tensors (same s for queries and keys), restricted to a
    window of W keys when ``window`` is set (None or W >= s: full causal), with optional per-head
    sink logits [h]. Returns [b, h, s, dv] laid out as [s, b, h, dv] in memory."""
    kern = KERNELS[kernel]
    s = q.shape[2]
    if k.shape[2] != s:
        raise ValueError(f"band_attention needs as many keys as queries (got {s} and {k.shape[2]})")
    w = s if window is None or window >= s else int(window)
    if w < 2:
        raise ValueError(f"band_attention needs a window of at least 2 keys (got {window})")
    if k.shape[1] != q.shape[1] and not kern.gqa:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return _BandAttention.apply(q, k, v, sink, scale, w, kern)


_PROBED: dict = {}


def usable(kernel: str, q: torch.Tensor, dv: int) -> bool:
    """Whether ``kernel`` runs on this device / dtype / head size (probed once per combination on a
    small problem, forward and backward)."""
    if kernel == "math":
        return True
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (kernel, q.device.index, q.dtype, q.shape[-1], dv)
    if key not in _PROBED:
        # The first call may come from an evaluation under no_grad / inference_mode: probe the
        # backward regardless, or the answer would be "no" for the rest of the process.
        with torch.inference_mode(False), torch.enable_grad():
            try:
                t = lambda d: torch.randn(1, 2, 256, d, device=q.device, dtype=q.dtype, requires_grad=True)  # noqa: E731
                a, b_, c = t(q.shape[-1]), t(q.shape[-1]), t(dv)
                band_attention(a, b_, c, 1.0 / math.sqrt(q.shape[-1]), 128, kernel=kernel).sum().backward()
                _PROBED[key] = True
            except (RuntimeError, NotImplementedError):
                _PROBED[key] = False
    return _PROBED[key]
