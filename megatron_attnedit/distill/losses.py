"""Distillation losses, written for megatron's tensor-parallel layout.

* ``normalized_mse`` -- stage 1: per token, sum of squared error over sum of squared target,
  averaged over tokens.
* ``kl_divergence`` / ``topk_kl_divergence`` -- stage 2: KL(teacher || student) of the next-token
  distributions at temperature T (scaled by T^2), on **vocab-parallel** logits ``[..., V/tp]``.
  Like megatron's ``vocab_parallel_cross_entropy`` the vocabulary is never gathered: each rank
  reduces its shard and only per-token scalars (max, sum of exp, partial sums) and, for top-k,
  k candidates per rank are exchanged across the TP group. Gradients are written analytically
  (``T * (q - p)``), so nothing of size V is all-reduced in backward either.
* ``cross_entropy`` -- optional CE on the data labels, the same machinery with a one-hot target.
* ``feature_cosine`` -- weak feature matching ``lambda * (1 - cos)`` between hidden states.

Padded vocabulary entries (megatron pads V to a multiple of 128) are excluded from every softmax
when ``vocab_size`` (the real size) is given, so the losses equal those of the unpadded HF model.

Token averages take an optional ``loss_mask`` and, under sequence parallelism (tokens split over
the TP group), are averaged over the whole sequence with an all-reduce whose backward is the
identity, so each rank back-propagates exactly its own tokens' share.
"""

from __future__ import annotations

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
    """Stage-1 loss: normalized MSE per token, averaged over tokens. ``pred``/``target`` ``[..., h]``."""
    return token_mean(normalized_mse_per_token(pred, target), loss_mask, sp_group)


# ----------------------------------------------------------------------------------------------
# Vocab-parallel log-softmax pieces
# ----------------------------------------------------------------------------------------------


def vocab_range(local_vocab: int, group, vocab_size: Optional[int]) -> Tuple[int, int]:
    """(first global id of this rank's shard, number of real -- unpadded -- ids in it)."""
    rank = 0 if group is None else dist.get_rank(group)
    start = rank * local_vocab
    if vocab_size is None:
        return start, local_vocab
    return start, max(0, min(local_vocab, vocab_size - start))


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _log_softmax_parallel_(z: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place on ``z`` (a fresh fp32 tensor): (log-softmax of this shard over the global
    vocabulary -- ``z`` itself --, softmax of this shard)."""
    if z.shape[-1] == 0:  # a shard made only of vocabulary padding
        zmax = torch.full(z.shape[:-1] + (1,), float("-inf"), device=z.device)
    else:
        zmax = z.max(dim=-1, keepdim=True)[0]
    _all_reduce(zmax, group, dist.ReduceOp.MAX)
    z.sub_(zmax)
    e = z.exp()
    sum_e = _all_reduce(e.sum(dim=-1, keepdim=True), group)
    z.sub_(sum_e.log())
    return z, e.div_(sum_e)


class _DenseKL(torch.autograd.Function):
    """Per-token KL(softmax(t/T) || softmax(s/T)) on vocab-parallel logits, gradient for ``s`` only."""

    @staticmethod
    def forward(ctx, s, t, temperature, valid, group):
        local = s.shape[-1]
        # four [..., V/tp] fp32 buffers at the peak: log q, q, log p, p (everything else in place)
        log_q, q = _log_softmax_parallel_(s[..., :valid].float() / temperature, group)
        log_p, p = _log_softmax_parallel_(t[..., :valid].float() / temperature, group)
        kl = log_p.sub_(log_q).mul_(p).sum(dim=-1)  # p (log p - log q)
        del log_p, log_q
        _all_reduce(kl, group)
        ctx.save_for_backward(q.sub_(p))  # gradient direction q - p, the only thing backward needs
        ctx.temperature, ctx.local, ctx.dtype = temperature, local, s.dtype
        return kl

    @staticmethod
    def backward(ctx, grad):
        (q_minus_p,) = ctx.saved_tensors
        g = q_minus_p * (grad.unsqueeze(-1) / ctx.temperature)
        if g.shape[-1] != ctx.local:
            g = F.pad(g, (0, ctx.local - g.shape[-1]))
        return g.to(ctx.dtype), None, None, None, None


class _SparseCE(torch.autograd.Function):
    """Per-token -sum_i w_i log softmax(s/T)[id_i] on vocab-parallel logits; ``ids``/``w`` ``[..., k]``
    hold global vocabulary ids and target weights (summing to 1), the same on every TP rank."""

    @staticmethod
    def forward(ctx, s, ids, w, temperature, start, valid, group):
        local = s.shape[-1]
        log_q, q = _log_softmax_parallel_(s[..., :valid].float() / temperature, group)
        owned = (ids >= start) & (ids < start + valid)
        local_ids = torch.where(owned, ids - start, torch.zeros_like(ids))
        if valid > 0:
            picked = torch.where(owned, log_q.gather(-1, local_ids), torch.zeros((), device=s.device))
        else:
            picked = torch.zeros(ids.shape, device=s.device)
        _all_reduce(picked, group)  # log q at each target id, from the rank that owns it
        ce = -(w * picked).sum(dim=-1)
        # gradient direction: q - (target weights scattered onto this shard)
        if valid > 0:
            q.scatter_add_(-1, local_ids, -(w * owned.to(w.dtype)))
        ctx.save_for_backward(q)
        ctx.temperature, ctx.local, ctx.dtype = temperature, local, s.dtype
        return ce

    @staticmethod
    def backward(ctx, grad):
        (q_minus_w,) = ctx.saved_tensors
        g = q_minus_w * (grad.unsqueeze(-1) / ctx.temperature)
        if g.shape[-1] != ctx.local:
            g = F.pad(g, (0, ctx.local - g.shape[-1]))
        return g.to(ctx.dtype), None, None, None, None, None, None


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
) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over tokens (weighted by ``loss_mask``).

    Logits are this rank's vocabulary shard ``[..., V/tp]`` (``tp_group`` = the TP group, or None
    for a single shard); ``vocab_size`` is the real vocabulary size (padded ids are ignored).
    """
    _check_logits(student_logits, teacher_logits)
    _, valid = vocab_range(student_logits.shape[-1], tp_group, vocab_size)
    kl = _DenseKL.apply(student_logits, teacher_logits.detach(), float(temperature), valid, tp_group)
    return temperature**2 * token_mean(kl, loss_mask)


def topk_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    loss_mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group=None,
) -> torch.Tensor:
    """Top-k KL: the teacher's k most likely ids, their probabilities renormalised over the k, against
    the student's full-vocabulary log-probabilities at those ids; T^2-scaled, token-averaged.

    Each rank takes its shard's top-k, the TP group all-gathers the k x tp candidates (ids and
    logits, small) and every rank picks the same global top-k.
    """
    _check_logits(student_logits, teacher_logits)
    start, valid = vocab_range(student_logits.shape[-1], tp_group, vocab_size)
    with torch.no_grad():
        zt = teacher_logits[..., :valid].float() / temperature
        kk = min(k, valid)
        vals, idx = zt.topk(kk, dim=-1) if kk > 0 else (zt[..., :0], zt[..., :0].long())
        idx = idx + start
        if _group_size(tp_group) > 1:
            n = _group_size(tp_group)
            # ranks may own different numbers of real ids: pad every candidate list to k
            pad = k - kk
            if pad:
                vals = F.pad(vals, (0, pad), value=float("-inf"))
                idx = F.pad(idx, (0, pad), value=0)
            all_vals = [torch.empty_like(vals) for _ in range(n)]
            all_idx = [torch.empty_like(idx) for _ in range(n)]
            dist.all_gather(all_vals, vals.contiguous(), group=tp_group)
            dist.all_gather(all_idx, idx.contiguous(), group=tp_group)
            vals, pos = torch.cat(all_vals, -1).topk(k, dim=-1)
            idx = torch.cat(all_idx, -1).gather(-1, pos)
        log_p = torch.log_softmax(vals, dim=-1)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(-1)
    ce = _SparseCE.apply(student_logits, idx, p, float(temperature), start, valid, tp_group)
    return temperature**2 * token_mean(neg_entropy + ce, loss_mask)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    tp_group=None,
) -> torch.Tensor:
    """Next-token cross-entropy on vocab-parallel logits ``[..., V/tp]``, labels ``[...]``, token mean."""
    start, valid = vocab_range(logits.shape[-1], tp_group, vocab_size)
    ids = labels.long().unsqueeze(-1)
    w = torch.ones(ids.shape, device=logits.device, dtype=torch.float32)
    ce = _SparseCE.apply(logits, ids, w, 1.0, start, valid, tp_group)
    return token_mean(ce, loss_mask)


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


def _check_logits(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape:
        raise ValueError(
            f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ; "
            "teacher and student must share the vocabulary and the parallel layout"
        )
