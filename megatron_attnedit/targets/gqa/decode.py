"""Kind "gqa": the teacher's attention (Qwen3 / Qwen3-MoE / Llama) with full K and V of every KV head.

Cache per layer: K and V [batch, kv_heads, slots, head_dim], RoPE applied before caching (keys are
stored at their absolute position). Slot of position p: p mod slots -- the position itself in a
full layer (slots = max_len), a ring buffer in a sliding layer (slots = min(W, max_len), used by
the GateSWA kind that extends this one): once the ring has wrapped it holds exactly the positions
p - W < j <= p that a sliding window of W keys lets position p see.

Projections, q/k-norms and o_proj are the model's own modules; Qwen3's order is projection,
per-head RMSNorm, RoPE (rotate-half); Llama's the same without the norm.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_attnedit.attention.decode_kernels import causal_attention
from megatron_attnedit.attention.decode_base import CachedAttention
from megatron_attnedit.attention.rope_tables import rotate_half


def _identity(x):
    return x


class GQAAttention(CachedAttention):
    name = "gqa"
    cache_names = ("k", "v")

    def __init__(self, attn, layer, config, options):
        super().__init__(attn, layer, config, options)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(attn, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scale = float(attn.scaling)
        self.window: Optional[int] = None  # sliding layers: W keys (GateSWA)
        self.sinks: Optional[torch.Tensor] = None  # per-head sink logits (GateSWA)
        self.k = self.v = None

    def slots(self, max_len):
        return max_len if self.window is None else min(self.window, max_len)

    def allocate(self, batch, max_len, device, dtype):
        n = self.slots(max_len)
        self.k = torch.zeros(batch, self.kv_heads, n, self.head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def _project(self, x, cos, sin):
        """q [b, heads, s, d], k and v [b, kv_heads, s, d] (q and k normed and rotated)."""
        a = self.attn
        shape = (*x.shape[:2], -1, self.head_dim)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        q_norm, k_norm = getattr(a, "q_norm", None) or _identity, getattr(a, "k_norm", None) or _identity  # Llama has none
        q = rotate_half(q_norm(a.q_proj(x).view(shape)), cos, sin)
        k = rotate_half(k_norm(a.k_proj(x).view(shape)), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), a.v_proj(x).view(shape).transpose(1, 2)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [b, heads, s, d] -> o_proj over [b, s, heads * d]."""
        return self.attn.o_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))

    def prefill(self, x, cos, sin):
        q, k, v = self._project(x, cos, sin)
        s, n = k.shape[2], self.k.shape[2]
        if s <= n:
            self.k[:, :, :s] = k
            self.v[:, :, :s] = v
        else:  # a ring shorter than the prompt keeps its last n positions, each in slot p mod n
            slots = torch.arange(s - n, s, device=k.device) % n
            self.k.index_copy_(2, slots, k[:, :, s - n :])
            self.v.index_copy_(2, slots, v[:, :, s - n :])
        return self._output(causal_attention(q, k, v, self.scale, self.window, self.sinks), x)

    def step(self, x, pos, cos, sin):
        q, k, v = self._project(x, cos, sin)
        slot = pos % self.k.shape[2]
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        b = x.shape[0]
        grouped = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)  # query heads of one KV head together
        o = self._attend(grouped, self.k, self.v, pos, self.scale, self.sinks)
        return self._output(o.reshape(b, self.heads, 1, self.head_dim), x)


ATTENTION = GQAAttention  # what the decode engine builds per layer
