"""Distillation losses, written for megatron's tensor-parallel layout.

* ``normalized_mse`` -- stage 1: per token, sum of squared error over sum of squared target,
  averaged over tokens.
* ``kl_divergence`` / ``topk_kl_divergence`` -- stage 2: KL(teacher || student) of the next-token
  distributions at temperature T (scaled by T^2), on **vocab-parallel** logits ``[..., V/tp]``.
  Like megatron's ``vocab_parallel_cross_entropy`` the vocabulary is never gathered: each rank
  reduces its shard and only per-token scalars (max, sum of exp, partial sums) and, for top-k,
  k candidates per rank are exchanged across the TP group. Gradients are written analytically
  (``(q - p) / T``), so nothing of size V is all-reduced in backward either.
* ``cross_entropy`` -- optional CE on the data labels, the same machinery with a one-hot target.
* ``feature_cosine`` -- weak feature matching ``lambda * (1 - cos)`` between hidden states.

Memory: the vocabulary-sized work runs over chunks of tokens (``chunk_tokens``; by default
``CHUNK_BYTES`` per fp32 ``[chunk, V/tp]`` buffer), so at most one chunk's fp32 temporaries exist at
a time (three for KL, one for CE). The forward writes the logits gradient of each chunk straight
into one buffer of the logits' dtype; backward only scales it in place (``_GradInForward``). At
Qwen3 size (V = 151,936, 4096 tokens, TP=1) the former unchunked KL peaked at four 2.5 GB fp32
buffers and kept one of them until backward (megatron's vocab-parallel CE keeps a 2.5 GB fp32
softmax); chunked, KL peaks at three 256 MiB fp32 buffers plus the 1.25 GB bf16 gradient, which
takes the place of the student logits (nothing needs those after the forward). Recomputing the
softmax in backward from saved logits was the other choice: it keeps both logits (2 x 1.25 GB in
bf16) and pays the exponentials twice. Chunks are cut identically on every TP rank (same tokens,
same ``V/tp``), each chunk exchanges only per-token scalars, and the per-token sums accumulate in
fp64: values and gradients do not depend on the chunk size (equal to the last bit in the tests).

Speed: each chunk is three passes over the logits (row max, sums, gradient). On CUDA each pass is
one inductor-fused kernel reading the bf16 logits (``FUSED``; ``ATTNEDIT_FUSED_LOSSES=0`` turns it
off), which keeps no fp32 buffer, so the automatic chunk is then the whole micro-batch. At Qwen3
size on an H100 (launch/bench_losses.py): KL fwd+bwd 60.1 -> 7.3 ms, CE 33.1 -> 6.0 ms, same loss,
gradient within 2e-9 of the eager passes.

Padded vocabulary entries (megatron pads V to a multiple of 128) are excluded from every softmax
when ``vocab_size`` (the real size) is given, so the losses equal those of the unpadded HF model.

Token averages take an optional ``loss_mask`` and, under sequence parallelism (tokens split over
the TP group), are averaged over the whole sequence with an all-reduce whose backward is the
identity, so each rank back-propagates exactly its own tokens' share.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Token averages
# ----------------------------------------------------------------------------------------------


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Forward: all-reduce sum over ``group``; backward: identity (each rank owns its share)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def token_mean(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor] = None, sp_group=None) -> torch.Tensor:
    """Mean of ``per_token`` over tokens, weighted by ``loss_mask`` (same shape) if given.

    ``sp_group``: the TP group when the tokens are split over it (sequence parallel), else None.
    """
    per_token = per_token.float()
    if loss_mask is None:
        num = per_token.sum()
        den = torch.tensor(float(per_token.numel()), device=per_token.device)
    else:
        m = loss_mask.to(per_token.dtype).reshape(per_token.shape)
        num = (per_token * m).sum()
        den = m.sum()
    if _group_size(sp_group) > 1:
        num = _AllReduceSumIdentityGrad.apply(num, sp_group)
        den = den.detach().clone()
        dist.all_reduce(den, group=sp_group)
    return num / den.clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# Stage 1: normalized MSE
# ----------------------------------------------------------------------------------------------


def normalized_mse_per_token(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """sum_h (pred - target)^2 / sum_h target^2 per token (last dim = hidden), in fp32."""
    pred, target = pred.float(), target.detach().float()
    return (pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=eps)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor, loss_mask=None, sp_group=None) -> torch.Tensor:
    """Stage-1 loss: normalized MSE per token, averaged over tokens. ``pred``/``target`` ``[..., h]``.
    The per-token part is ``normalized_mse_per_token`` as two passes (``_NormalizedMSE``), each one
    compiled kernel on CUDA (``FUSED``)."""
    return token_mean(_NormalizedMSE.apply(pred, target), loss_mask, sp_group)


def _nmse_forward(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12):
    """(per-token loss, fp32 difference, per-token denominator)."""
    d = pred.float() - target.float()
    den = target.float().pow(2).sum(-1).clamp(min=eps)
    return d.pow(2).sum(-1) / den, d, den


def _nmse_backward(grad: torch.Tensor, d: torch.Tensor, den: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (d * (2.0 * grad / den).unsqueeze(-1)).to(dtype)


class _NormalizedMSE(torch.autograd.Function):
    """Saves only the fp32 difference and the denominators (what eager autograd of
    ``normalized_mse_per_token`` keeps too), never ``target``: the teacher's layer adds its residual
    into that tensor in place right after stage 1's hook has read it."""

    @staticmethod
    def forward(ctx, pred, target):
        loss, d, den = _pass(_nmse_forward)(pred, target.detach())
        ctx.save_for_backward(d, den)
        ctx.dtype = pred.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        d, den = ctx.saved_tensors
        return _pass(_nmse_backward)(grad, d, den, ctx.dtype), None


# ----------------------------------------------------------------------------------------------
# Vocab-parallel softmax losses, token chunk by token chunk
# ----------------------------------------------------------------------------------------------

# Default chunk: as many tokens as keep one fp32 [chunk, V/tp] buffer near this size (about 440
# tokens at V = 151,936 and TP=1; a whole micro-batch at toy sizes).
CHUNK_BYTES = 256 * 2**20


def vocab_range(local_vocab: int, group, vocab_size: Optional[int]) -> Tuple[int, int]:
    """(first global id of this rank's shard, number of real -- unpadded -- ids in it)."""
    rank = 0 if group is None else dist.get_rank(group)
    start = rank * local_vocab
    if vocab_size is None:
        return start, local_vocab
    return start, max(0, min(local_vocab, vocab_size - start))


def chunk_size(local_vocab: int, chunk_tokens: Optional[int]) -> int:
    """Tokens per chunk: ``chunk_tokens`` if > 0, all tokens if 0, by ``CHUNK_BYTES`` if None."""
    if chunk_tokens is None:
        return max(1, CHUNK_BYTES // (4 * max(1, local_vocab)))
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0 = all tokens at once) or None (automatic), got {chunk_tokens}")
    return chunk_tokens or 2**62


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _Rows:
    """The token dimensions of ``[..., V]`` logits in storage order, as rows ``[R, ..., V]``.

    GPTModel returns ``[b, s, V]`` as a transposed view of a contiguous ``[s, b, V]``: chunks are
    then taken along s, so each one is a contiguous slab, and the gradient buffer is allocated as
    a contiguous ``[s, b, V]`` -- the layout the output layer's backward wants (stage2._SBHGrad).
    """

    def __init__(self, x: torch.Tensor):
        self.mode = "1d" if x.dim() == 1 else "sbh" if x.dim() == 3 and x.transpose(0, 1).is_contiguous() else "plain"

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0) if self.mode == "1d" else x.transpose(0, 1) if self.mode == "sbh" else x

    def logical(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(0) if self.mode == "1d" else x.transpose(0, 1) if self.mode == "sbh" else x

    def rows_per_chunk(self, rows: torch.Tensor, chunk_tokens: Optional[int], fused: bool = False) -> int:
        """Rows per chunk; automatic (None) with ``fused`` passes: all rows at once, as those passes
        keep no fp32 [chunk, V] buffer (whole micro-batch CE 5.95 ms vs 8.70 ms in 441-token chunks
        at Qwen3 size on an H100, same peak memory: launch/bench_losses.py)."""
        if chunk_tokens is None and fused:
            return max(1, rows.shape[0])
        tokens_per_row = 1
        for d in rows.shape[1:-1]:
            tokens_per_row *= d
        return max(1, chunk_size(rows.shape[-1], chunk_tokens) // max(1, tokens_per_row))


def _grad_buffer(rows: torch.Tensor, valid: int) -> torch.Tensor:
    """Where the forward writes the logits gradient (rows layout, the logits' dtype); padded ids get 0."""
    g = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    if valid < rows.shape[-1]:
        g[..., valid:].zero_()
    return g


# Each loss runs per chunk of rows in three passes over the (bf16) logits -- row max, sums, gradient
# -- with the all-reduces of vocabulary-parallel shards between them. On CUDA each pass is compiled
# by inductor into one fused kernel that reads the logits and keeps the fp32 values in registers
# (8 bytes moved per logit instead of ~44 through fp32 [chunk, V] buffers: launch/bench_losses.py);
# elsewhere the same functions run eagerly, op for op the formulas documented below.
FUSED = os.environ.get("ATTNEDIT_FUSED_LOSSES", "1") != "0"
_COMPILED: dict = {}
_MAX_FUSED_IDS = 8  # sparse CE: target ids per token handled by the fused gradient pass


def _fuses(logits: torch.Tensor) -> bool:
    """Whether the loss passes over these logits run fused (inductor on CUDA)."""
    return FUSED and logits.is_cuda


def _pass(fn):
    """``fn`` compiled on CUDA (once per function; inductor specialises on shapes), eager elsewhere."""

    def call(x, *args):
        if _fuses(x):
            c = _COMPILED.get(fn)
            if c is None:
                c = _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
            return c(x, *args)
        return fn(x, *args)

    return call


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    z = x.float()
    return z / temperature if temperature != 1.0 else z


@_pass
def _max2(s, t, temperature: float):
    return torch.stack([_scaled(s, temperature).amax(dim=-1), _scaled(t, temperature).amax(dim=-1)])


@_pass
def _kl_sums(s, t, m, temperature: float):
    zs = _scaled(s, temperature) - m[0].unsqueeze(-1)
    zt = _scaled(t, temperature) - m[1].unsqueeze(-1)
    et = zt.exp()
    a = ((zt - zs) * et).sum(dim=-1, dtype=torch.float64)
    return torch.stack([zs.exp().sum(dim=-1, dtype=torch.float64), et.sum(dim=-1, dtype=torch.float64), a])


@_pass
def _kl_grad(s, t, m, s_s, s_t, temperature: float, out):
    es = (_scaled(s, temperature) - m[0].unsqueeze(-1)).exp() / s_s.float().unsqueeze(-1)
    et = (_scaled(t, temperature) - m[1].unsqueeze(-1)).exp() / s_t.float().unsqueeze(-1)
    out.copy_(es - et)


def _dense_kl_rows(s, t, temperature, valid, group, step, grad):
    """Per-token KL(softmax(t/T) || softmax(s/T)) on rows-layout shards; writes (q - p) into ``grad``
    (if given). Per chunk: three passes (``FUSED`` above) and two all-reduces, [2, chunk] (max) and
    [3, chunk] (sums); with z = logit/T - max,

        KL = sum_v p_v (log p_v - log q_v) = A / S_t - log S_t + log S_s,
        S_x = sum_v exp(z_x),   A = sum_v exp(z_t) (z_t - z_s),

    so each rank's partial S_s, S_t and A are summed in one exchange. The sums accumulate in fp64
    (elementwise work stays fp32): the terms are O(log V) while a converged KL is ~0.01, and fp32
    sums would make its value depend on summation order -- chunk size, TP size -- at ~1e-5."""
    kl = torch.empty(s.shape[:-1], dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], step):
        sc, tc = s[i:i + step, ..., :valid], t[i:i + step, ..., :valid]
        if valid == 0:  # a shard made only of vocabulary padding
            m = torch.full((2,) + sc.shape[:-1], float("-inf"), device=s.device)
        else:
            m = _max2(sc, tc, temperature)
        m = _all_reduce(m, group, dist.ReduceOp.MAX)
        if valid == 0:
            sums = torch.zeros((3,) + sc.shape[:-1], dtype=torch.float64, device=s.device)
        else:
            sums = _kl_sums(sc, tc, m, temperature)
        s_s, s_t, a = _all_reduce(sums, group).unbind(0)
        kl[i:i + step] = a / s_t - s_t.log() + s_s.log()
        if grad is not None and valid > 0:  # q - p
            _kl_grad(sc, tc, m, s_s, s_t, temperature, grad[i:i + step, ..., :valid])
    return kl


@_pass
def _max1(s, temperature: float):
    return _scaled(s, temperature).amax(dim=-1)


@_pass
def _ce_sums(s, m, temperature: float, local_ids, owned):
    z = _scaled(s, temperature) - m.unsqueeze(-1)
    picked = torch.where(owned, z.gather(-1, local_ids), torch.zeros((), device=z.device))
    return torch.cat([z.exp().sum(dim=-1, keepdim=True, dtype=torch.float64), picked.double()], dim=-1)


@_pass
def _ce_grad(s, m, s_e, temperature: float, local_ids, coef, out):
    q = (_scaled(s, temperature) - m.unsqueeze(-1)).exp() / s_e.float().unsqueeze(-1)
    if local_ids.shape[-1] <= _MAX_FUSED_IDS:  # elementwise: one compare per target id, fuses
        col = torch.arange(q.shape[-1], device=q.device)
        for j in range(local_ids.shape[-1]):
            q = q + torch.where(col == local_ids[..., j:j + 1], coef[..., j:j + 1], torch.zeros((), device=q.device))
    else:
        q = q.scatter_add(-1, local_ids, coef)
    out.copy_(q)


def _sparse_ce_rows(s, ids, w, temperature, start, valid, group, step, grad):
    """Per-token -sum_i w_i log softmax(s/T)[id_i] on rows-layout shards; writes (q - w scattered)
    into ``grad`` (if given). Per chunk: three passes and two all-reduces, [chunk] (max) and
    [chunk, 1 + k] (sum of exp and the shifted logits at the target ids, from their owner; fp64 as
    in ``_dense_kl_rows``)."""
    ce = torch.empty(s.shape[:-1], dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], step):
        sc = s[i:i + step, ..., :valid]
        idc, wc = ids[i:i + step], w[i:i + step]
        owned = (idc >= start) & (idc < start + valid)
        local_ids = torch.where(owned, idc - start, torch.zeros_like(idc))
        if valid == 0:  # a shard made only of vocabulary padding
            m = torch.full(sc.shape[:-1], float("-inf"), device=s.device)
        else:
            m = _max1(sc, temperature)
        m = _all_reduce(m, group, dist.ReduceOp.MAX)
        if valid == 0:
            sums = torch.zeros(idc.shape[:-1] + (1 + idc.shape[-1],), dtype=torch.float64, device=s.device)
        else:
            sums = _ce_sums(sc, m, temperature, local_ids, owned)
        sums = _all_reduce(sums, group)
        s_e, picked = sums[..., 0], sums[..., 1:]
        ce[i:i + step] = s_e.log() * wc.sum(dim=-1) - (wc * picked).sum(dim=-1)
        if grad is not None and valid > 0:
            _ce_grad(sc, m, s_e, temperature, local_ids, -(wc * owned.to(wc.dtype)).float(), grad[i:i + step, ..., :valid])
    return ce


class _GradInForward(torch.autograd.Function):
    """Per-token loss whose logits gradient the forward already wrote: ``compute(rows, grad)``
    returns the loss and fills ``grad`` with d loss / d (logits / T).

    Backward scales that buffer in place by the incoming per-token gradient / T: no softmax is
    recomputed and nothing else of size V is kept between forward and backward. Between them the
    buffer (logits dtype, the size of the logits) is all that lives; the logits themselves can be
    freed. In bf16 the gradient is rounded twice (q - p, then the scaled value) -- about one bf16
    unit, the precision a bf16 gradient has anyway. The buffer is used up: backward runs once.
    """

    @staticmethod
    def forward(ctx, s, compute, valid, temperature, step):
        layout = _Rows(s)
        rows = layout.rows(s)
        grad = _grad_buffer(rows, valid)
        loss = compute(rows, grad)
        ctx.save_for_backward(grad)
        ctx.layout, ctx.temperature, ctx.step = layout, temperature, step
        return layout.logical(loss)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale = ctx.layout.rows(grad_loss).unsqueeze(-1) / ctx.temperature
        # by chunks too: a bf16 *= fp32 product over the whole buffer makes fp32 temporaries (CPU)
        for i in range(0, grad.shape[0], ctx.step):
            grad[i:i + ctx.step].mul_(scale[i:i + ctx.step])
        return ctx.layout.logical(grad), None, None, None, None


def _per_token(s: torch.Tensor, compute, valid: int, temperature: float, step: int) -> torch.Tensor:
    """``compute(rows of s, grad buffer or None)``, with autograd when ``s`` needs a gradient (an
    evaluation under no_grad writes no gradient)."""
    if torch.is_grad_enabled() and s.requires_grad:
        return _GradInForward.apply(s, compute, valid, temperature, step)
    layout = _Rows(s)
    return layout.logical(compute(layout.rows(s), None))


# ----------------------------------------------------------------------------------------------
# Stage 2 losses
# ----------------------------------------------------------------------------------------------


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group=None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over tokens (weighted by ``loss_mask``).

    Logits are this rank's vocabulary shard ``[..., V/tp]`` (``tp_group`` = the TP group, or None
    for a single shard); ``vocab_size`` is the real vocabulary size (padded ids are ignored).
    ``chunk_tokens``: tokens per chunk (None: by ``CHUNK_BYTES``; 0: all at once).
    """
    _, valid, layout, t_rows, step = _teacher_rows(student_logits, teacher_logits, vocab_size, tp_group, chunk_tokens,
                                                   fused=_fuses(student_logits))
    T = float(temperature)
    kl = _per_token(student_logits, lambda rows, grad: _dense_kl_rows(rows, t_rows, T, valid, tp_group, step, grad), valid, T, step)
    return temperature**2 * token_mean(kl, loss_mask)


@torch.no_grad()
def _teacher_topk(t_rows, k, temperature, start, valid, group, step):
    """The teacher's global top-k per token: (ids, probabilities renormalised over the k, sum p log p),
    rows layout. Each rank takes its shard's top-k in the logits' own dtype (the order of t/T in fp32
    is the same), the TP group all-gathers the k x tp candidates and every rank picks the same k."""
    kk = min(k, valid)
    vals, idx = [], []
    for i in range(0, t_rows.shape[0], step):
        zt = t_rows[i:i + step, ..., :valid]
        v, j = zt.topk(kk, dim=-1) if kk > 0 else (zt[..., :0], zt[..., :0].long())
        vals.append(v.float() / temperature)
        idx.append(j + start)
    vals, idx = torch.cat(vals), torch.cat(idx)
    if _group_size(group) > 1:
        n = _group_size(group)
        # ranks may own different numbers of real ids: pad every candidate list to k
        pad = k - kk
        if pad:
            vals = F.pad(vals, (0, pad), value=float("-inf"))
            idx = F.pad(idx, (0, pad), value=0)
        all_vals = [torch.empty_like(vals) for _ in range(n)]
        all_idx = [torch.empty_like(idx) for _ in range(n)]
        dist.all_gather(all_vals, vals.contiguous(), group=group)
        dist.all_gather(all_idx, idx.contiguous(), group=group)
        vals, pos = torch.cat(all_vals, -1).topk(k, dim=-1)
        idx = torch.cat(all_idx, -1).gather(-1, pos)
    log_p = torch.log_softmax(vals, dim=-1)
    p = log_p.exp()
    return idx, p, (p * log_p).sum(-1)


def topk_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    loss_mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group=None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Top-k KL: the teacher's k most likely ids, their probabilities renormalised over the k, against
    the student's full-vocabulary log-probabilities at those ids; T^2-scaled, token-averaged.
    ``chunk_tokens`` as in ``kl_divergence``.
    """
    start, valid, layout, t_rows, step = _teacher_rows(student_logits, teacher_logits, vocab_size, tp_group, chunk_tokens)
    T = float(temperature)
    ids, p, neg_entropy = _teacher_topk(t_rows, k, T, start, valid, tp_group, step)
    ce = _per_token(student_logits, lambda rows, grad: _sparse_ce_rows(rows, ids, p, T, start, valid, tp_group, step, grad), valid, T, step)
    return temperature**2 * token_mean(layout.logical(neg_entropy) + ce, loss_mask)


def cross_entropy_per_token(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: Optional[int] = None,
    tp_group=None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Next-token cross-entropy per token (fp32, shape of ``labels``) on vocab-parallel logits
    ``[..., V/tp]``; ``chunk_tokens`` as in ``kl_divergence``."""
    start, valid = vocab_range(logits.shape[-1], tp_group, vocab_size)
    layout = _Rows(logits)
    ids = layout.rows(labels.long().unsqueeze(-1))
    w = torch.ones(ids.shape, device=logits.device, dtype=torch.float32)
    step = layout.rows_per_chunk(layout.rows(logits), chunk_tokens, fused=_fuses(logits))
    return _per_token(logits, lambda rows, grad: _sparse_ce_rows(rows, ids, w, 1.0, start, valid, tp_group, step, grad), valid, 1.0, step)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    tp_group=None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Next-token cross-entropy on vocab-parallel logits ``[..., V/tp]``, labels ``[...]``, token mean."""
    return token_mean(cross_entropy_per_token(logits, labels, vocab_size, tp_group, chunk_tokens), loss_mask)


def feature_cosine(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: float = 0.05,
    loss_mask: Optional[torch.Tensor] = None,
    sp_group=None,
) -> torch.Tensor:
    """``weight * (1 - cos(student, teacher))`` per token over the hidden dim, averaged over tokens."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1, eps=1e-8)
    return weight * token_mean(1.0 - cos, loss_mask, sp_group)


def _teacher_rows(s: torch.Tensor, t: torch.Tensor, vocab_size: Optional[int], tp_group, chunk_tokens: Optional[int],
                  fused: bool = False) -> Tuple[int, int, _Rows, torch.Tensor, int]:
    """What both KL losses start from: (first global id of this shard, its real ids, the rows layout of
    the student's logits, the teacher's logits as rows without a gradient, rows per chunk)."""
    if s.shape != t.shape:
        raise ValueError(
            f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ; "
            "teacher and student must share the vocabulary and the parallel layout"
        )
    start, valid = vocab_range(s.shape[-1], tp_group, vocab_size)
    layout = _Rows(s)
    t_rows = layout.rows(t.detach())
    return start, valid, layout, t_rows, layout.rows_per_chunk(t_rows, chunk_tokens, fused=fused)
