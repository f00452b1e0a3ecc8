"""Decode attention over a static cache in one pass ("flash decoding"), in Triton, for the GPU.

Why not the matmul path (decode_kernels.cached_attention's reference): it writes every query head's
scores for every cached position, converts, scales, masks, softmaxes and casts them in separate
kernels, and reads the cache's values in a second matmul. For MLA the values are the first
kv_lora_rank columns of the cached keys, so its latent is read from memory twice per step, and the
score traffic (32 heads x fp32 per position, several passes) is of the same size as its 1152-byte
cache row: MLA's decode then reads about twice what its cache holds, where a serving kernel reads it
once (vLLM's and FlashMLA's decode kernels). This kernel keeps scores in registers, reads each
cached row once for the scores and (from the cache lines just loaded) for the output, and splits
the cached positions over many programs so that one sequence also fills the GPU:

  stage 1  program (sequence x key head, split): the query heads of that key head against the
           split's positions, online softmax in fp32 -> partial (max, sum, weighted values)
  stage 2  program (sequence x query head): the splits' partials combined, the sink logit (GateSWA)
           added to the normaliser, the output written in the cache's dtype

The valid positions are the slots <= pos, read from the one-element device tensor the engine
advances, so a CUDA graph replays the same launch at every position; a split past pos reads nothing.
Head sizes must be a power of two, or one plus a smaller one (MLA: 512 + 64); other shapes, a CPU
tensor or no Triton fall back to the matmul path. Under TRITON_INTERPRET=1 it also runs on CPU
tensors (the tests check it there against the matmul path).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

try:  # Triton ships with CUDA builds of torch; the CPU build and Ascend have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def split_dim(d: int) -> Optional[Tuple[int, int]]:
    """(main, tail) with main a power of two and tail 0 or a smaller power of two, summing to d."""
    if _pow2(d):
        return d, 0
    main = 1 << (d.bit_length() - 1)
    return (main, d - main) if _pow2(d - main) else None


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this kernel computes ``q`` against ``k`` / ``v`` (else: the matmul path)."""
    if triton is None or not (q.is_cuda or INTERPRET):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    dims = split_dim(q.shape[-1])
    if dims is None or not _pow2(v.shape[-1]):
        return False
    # compiled, tl.dot takes 16 or more along every axis (the interpreter takes any size)
    return INTERPRET or (min(dims[0], v.shape[-1]) >= 16 and dims[1] in (0,) + tuple(range(16, dims[0])))


def _splits(rows: int, n: int, device) -> Tuple[int, int]:
    """(splits, positions per split): enough programs to fill the GPU several times over, no split
    shorter than 256 positions; a multiple of 128 positions (every BLOCK_N below divides it)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, -(-4 * sms // rows))
    splits = max(1, min(want, n // 256, 128))
    per = -(-n // splits)
    per = -(-per // 128) * 128
    return -(-n // per), per


if triton is not None:

    @triton.jit
    def _partial(Q, K, V, POS, ACC, M, L,
                 sq_b, sq_h, sq_g, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                 kv_heads, n, per_split, group, nsplit, scale_log2,
                 G_PAD: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, DV: tl.constexpr,
                 V_IS_K: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // kv_heads).to(tl.int64)  # 64-bit offsets: a large batch's cache passes 2^31 elements
        h = (bh % kv_heads).to(tl.int64)
        pos = tl.load(POS)
        lo = split * per_split
        hi = tl.minimum(tl.minimum(lo + per_split, n), pos + 1)
        offs_g = tl.arange(0, G_PAD)
        g_ok = offs_g < group
        offs_d = tl.arange(0, D_MAIN)
        offs_v = tl.arange(0, DV)
        q_rows = Q + b * sq_b + h * sq_h + offs_g[:, None] * sq_g
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        if D_TAIL > 0:
            offs_t = D_MAIN + tl.arange(0, D_TAIL)
            q_tail = tl.load(q_rows + offs_t[None, :], mask=g_ok[:, None], other=0.0)
        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        m = tl.full([G_PAD], -1.0e30, tl.float32)  # finite: a split with no valid position stays NaN-free
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, DV], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if D_TAIL > 0:
                k_tail = tl.load(k_base + offs_n[:, None] * sk_n + offs_t[None, :], mask=n_ok[:, None], other=0.0)
                if IEEE:
                    s += tl.dot(q_tail, tl.trans(k_tail), input_precision="ieee")
                else:
                    s += tl.dot(q_tail, tl.trans(k_tail))
            s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if V_IS_K:  # MLA: the values are the keys' first DV = D_MAIN columns, the tile just loaded
                v = k
            else:
                v = tl.load(v_base + offs_n[:, None] * sv_n + offs_v[None, :], mask=n_ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        row = (bh.to(tl.int64) * group + offs_g) * nsplit + split
        tl.store(M + row, m, mask=g_ok)
        tl.store(L + row, l, mask=g_ok)
        tl.store(ACC + row[:, None] * DV + offs_v[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def _combine(ACC, M, L, SINKS, OUT, so_b, so_h, so_g, kv_heads, group, nsplit,
                 HAS_SINKS: tl.constexpr, S_PAD: tl.constexpr, DV: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # (sequence, key head, query head of its group)
        g = row % group
        bh = row // group
        b = bh // kv_heads
        h = bh % kv_heads
        offs_s = tl.arange(0, S_PAD)
        s_ok = offs_s < nsplit
        m = tl.load(M + row * nsplit + offs_s, mask=s_ok, other=-1.0e30)
        l = tl.load(L + row * nsplit + offs_s, mask=s_ok, other=0.0)
        top = tl.max(m, 0)
        w = tl.exp2(m - top)
        denom = tl.sum(l * w, 0)
        if HAS_SINKS:  # a virtual key of value zero: only the normaliser grows
            denom += tl.exp2(tl.load(SINKS + h * group + g).to(tl.float32) * 1.4426950408889634 - top)
        offs_v = tl.arange(0, DV)
        acc = tl.load(ACC + (row * nsplit + offs_s)[:, None] * DV + offs_v[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / denom
        tl.store(OUT + b * so_b + h * so_h + g * so_g + offs_v, out.to(OUT.dtype.element_ty))


def _wide(d_main: int, dv: int) -> bool:
    """MLA's 512-column latent: shorter key blocks and more warps for the [group, dv] fp32 accumulator."""
    return max(d_main, dv) >= 256


if triton is not None:
    # Tile sizes chosen on the GPU at the first call of each head shape, cache length and split
    # count (Triton's autotuner, outside any CUDA graph: the engine's warm-up steps); every BLOCK_N
    # divides the split length (128). Keyed on the cache length and splits too: tuned once at the
    # benchmark's short check (2 x 72 positions), MLA kept a tile that made one 32K sequence's step
    # slower than the teacher's on the H100.
    _CONFIGS = {
        True: [(16, 4, 2), (32, 4, 2), (32, 8, 2), (32, 8, 3), (64, 8, 2)],
        False: [(32, 4, 3), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)],
    }
    _TUNED = {
        wide: triton.autotune([triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st) for bn, w, st in configs],
                              key=["G_PAD", "D_MAIN", "D_TAIL", "DV", "V_IS_K", "n", "nsplit"])(_partial)
        for wide, configs in _CONFIGS.items()
    }


def decode_attention(q, k, v, pos, scale: float, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [b, kv_heads, group, d], k [b, kv_heads, n, d], v [b, kv_heads, n, dv] (may be a view of
    k), pos: one-element long tensor (slots <= pos are valid), sinks [kv_heads * group] or None ->
    [b, kv_heads, group, dv] in v's dtype."""
    b, kvh, group, d = q.shape
    n, dv = k.shape[2], v.shape[-1]
    d_main, d_tail = split_dim(d)
    nsplit, per = _splits(b * kvh, n, q.device)
    rows = b * kvh * group
    acc = torch.empty(rows * nsplit, dv, device=q.device, dtype=torch.float32)
    m = torch.empty(rows * nsplit, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot wants 16 rows or more
    v_is_k = v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and dv == d_main
    args = (q, k, v, pos, acc, m, l,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            kvh, n, per, group, nsplit, scale * LOG2E)
    meta = dict(G_PAD=g_pad, D_MAIN=d_main, D_TAIL=d_tail, DV=dv, V_IS_K=v_is_k, IEEE=q.dtype == torch.float32)
    if INTERPRET:  # one fixed tile: the interpreter checks results, not speed
        _partial[(b * kvh, nsplit)](*args, **meta, BLOCK_N=32, num_warps=4, num_stages=2)
    else:
        _TUNED[_wide(d_main, dv)][(b * kvh, nsplit)](*args, **meta)
    out = torch.empty(b, kvh, group, dv, device=q.device, dtype=v.dtype)
    _combine[(rows,)](
        acc, m, l, sinks if sinks is not None else m, out, out.stride(0), out.stride(1), out.stride(2), kvh, group, nsplit,
        HAS_SINKS=sinks is not None, S_PAD=max(2, triton.next_power_of_2(nsplit)), DV=dv, num_warps=4,
    )
    return out
