"""Causal and sliding-window attention on Ascend through ``torch_npu.npu_fusion_attention``.

The fused kernel takes the mask as a *sparse mode* plus a compressed 2048 x 2048 upper-triangular
boolean mask (True = masked) that it tiles itself, so no [s, s] mask is ever built:

* full causal, equal lengths: ``sparse_mode=2`` (leftUpCausal);
  unequal lengths (queries are the last sq positions): ``sparse_mode=3`` (rightDownCausal);
* sliding window of W keys: ``sparse_mode=4`` (band). The band keeps keys j with
  i - pre_tockens <= j <= i + next_tockens (right-down aligned when sq != sk), so the window
  i-W < j <= i is ``pre_tockens=W-1, next_tockens=0``.

Value heads narrower than the query's (MLA) are zero-padded to the query head size and the output
sliced back. Key/value may have fewer heads than the query (GQA) in the BNSD layout; ``head_num`` is the query's.
Sinks (one logit per head): the kernel's softmax statistics are not differentiable outputs, so
layers with sinks take the portable dense-bias path of core.py instead (correct, O(s^2) memory;
sinks are an option of GateSWA, not its default).

This file cannot run without an Ascend device; ``fusion_attention_args`` is what the CPU tests check.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_attnedit.attention.masks import attention_with_sink, window_mask

COMPRESSED_MASK_SIZE = 2048
_MASKS = {}


def compressed_mask(device) -> torch.Tensor:
    """The 2048 x 2048 upper-triangular (diagonal excluded) boolean mask the band/causal modes expect."""
    key = str(device)
    m = _MASKS.get(key)
    if m is None:
        m = torch.triu(torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device), diagonal=1)
        _MASKS[key] = m
    return m


def fusion_attention_args(sq: int, sk: int, heads: int, scale: float, window: Optional[int]) -> dict:
    """Keyword arguments of npu_fusion_attention (besides q, k, v and atten_mask) for causal
    attention over [b, heads, s, d] tensors, restricted to a causal window of W keys if given."""
    kw = dict(head_num=heads, input_layout="BNSD", scale=float(scale), keep_prob=1.0)
    if window is not None and window < sk:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        kw.update(sparse_mode=4, pre_tockens=int(window) - 1, next_tockens=0)
    elif sq == sk:
        kw.update(sparse_mode=2, pre_tockens=2147483647, next_tockens=0)
    else:
        kw.update(sparse_mode=3, pre_tockens=2147483647, next_tockens=0)
    return kw


def npu_attention(q, k, v, scale: float, window: Optional[int], sink: Optional[torch.Tensor] = None):
    """Causal (optionally windowed) attention on [b, h, s, d] tensors on an Ascend NPU."""
    if sink is not None:
        allowed = window_mask(q.shape[2], k.shape[2], window, q.device)
        return attention_with_sink(q, k, v, scale, allowed, sink, k.shape[1] != q.shape[1])
    import torch_npu

    kw = fusion_attention_args(q.shape[2], k.shape[2], q.shape[1], scale, window)
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        # MLA: value heads narrower than query/key heads; the kernel wants one head size.
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - dv))
    out = torch_npu.npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), atten_mask=compressed_mask(q.device), **kw
    )[0]
    return out[..., :dv]
