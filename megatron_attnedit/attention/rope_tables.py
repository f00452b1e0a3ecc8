"""RoPE for the engine: one table of cos/sin per model, applied in either of the two layouts.

The table is built from the model's own rotary module (its ``inv_freq`` buffer and
``attention_scaling``), as transformers computes it -- fp32 angles position x inv_freq -- once for
the positions 0 .. max_len - 1, so a decode step only gathers its row (no host value: a CUDA graph
replays it at any position).

Layouts (the same rotation, pairs taken differently):
* rotate-half (Qwen3, DeepSeek-V3 without ``rope_interleave``): pair (x[i], x[i + d/2]), computed in
  the input dtype with cos/sin cast to it, as transformers' ``apply_rotary_pos_emb``;
* interleaved (DeepSeek-V2, and V3 with ``rope_interleave``): pair (x[2i], x[2i+1]), computed in
  fp32 as V2's complex product. V3 permutes its interleaved result into rotate-half order; queries
  and keys get the same permutation, so their dot products -- all attention sees -- are equal.
"""

from __future__ import annotations

import torch


class RopeTable:
    """cos and sin [max_len, d/2] (fp32) of the model's rotary embedding."""

    def __init__(self, rotary_emb: torch.nn.Module, max_len: int, device):
        inv_freq = getattr(rotary_emb, "inv_freq", None)
        if inv_freq is None:
            raise TypeError(f"{type(rotary_emb).__name__} has no inv_freq buffer; the engine reads RoPE frequencies from it")
        scale = float(getattr(rotary_emb, "attention_scaling", 1.0))
        angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq.to(device=device, dtype=torch.float32))
        self.cos = angles.cos() * scale
        self.sin = angles.sin() * scale

    def rows(self, positions: torch.Tensor):
        """(cos, sin) [len(positions), d/2] for a 1-D tensor of positions."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., s, (heads,) d] with cos/sin broadcastable to [..., d/2]."""
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


LAYOUTS = {"rotate_half": rotate_half, "interleaved": interleaved}
