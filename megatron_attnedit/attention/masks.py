"""The causal / sliding-window mask, and attention with sink logits through SDPA with an explicit
mask: the fallback every platform's kernel shares (CPU, and the NPU path with sinks)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def window_mask(sq: int, sk: int, window: Optional[int], device) -> torch.Tensor:
    """Boolean [sq, sk] mask, True where attention is allowed (bottom-right aligned causal)."""
    q = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    k = torch.arange(sk, device=device).unsqueeze(0)
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def attention_with_sink(q, k, v, scale, allowed, sink, gqa):
    # One extra key per head: zero key and zero value, score = sink logit (as an additive bias).
    b, h, sq, d = q.shape
    bias = torch.zeros(sq, allowed.shape[1], dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    bias = bias.view(1, 1, sq, -1).expand(b, h, sq, -1)
    sink_col = sink.to(q.dtype).view(1, h, 1, 1).expand(b, h, sq, 1)
    bias = torch.cat([bias, sink_col], dim=-1)
    hk = k.shape[1]
    if gqa:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    k = torch.cat([k, k.new_zeros(b, h, 1, k.shape[-1])], dim=2)
    v = torch.cat([v, v.new_zeros(b, h, 1, v.shape[-1])], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
