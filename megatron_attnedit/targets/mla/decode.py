"""Kind "mla": DeepSeek-V2/V3 attention with the latent cache and absorbed up-projections.

Per layer and token the cache holds the normalised KV latent c (kv_lora_rank wide) and the RoPE'd
key k_pe shared by all heads (qk_rope_head_dim wide), side by side in one [batch, 1, slots,
kv_lora_rank + qk_rope_head_dim] tensor: (512 + 64) x 2 B = 1152 B per token per layer in bf16.
kv_b_proj = per head [W_UK,h ; W_UV,h] (qk_nope_head_dim + v_head_dim rows, kv_lora_rank columns)
is never applied to the cache in a decode step:

  score_h(i, j) = q_nope_h(i) . (W_UK,h c_j) + q_pe_h(i) . k_pe(j)
               = [W_UK,h^T q_nope_h(i), q_pe_h(i)] . [c_j, k_pe(j)]       W_UK absorbed into the query
  out_h(i)     = sum_j p_h(i, j) W_UV,h c_j = W_UV,h (sum_j p_h(i, j) c_j)  W_UV applied once, after

so a step reads each cached token once for the scores (one key head shared by all query heads)
and its latent once more for the output, whatever qk_nope_head_dim and v_head_dim are. The prefill
expands keys and values through kv_b_proj and runs causal attention on them (cheaper for s queries
than the absorbed form), writing the same latent cache.

RoPE: DeepSeek-V2 rotates interleaved pairs; V3 too when ``rope_interleave`` (its default), else
rotate-half (inference/rope.py). The query path is the model's own: q_proj, or q_a_proj ->
q_a_layernorm -> q_b_proj with a query latent (q_lora_rank).
"""

from __future__ import annotations

import torch

from megatron_attnedit.attention.decode_kernels import causal_attention
from megatron_attnedit.attention.decode_base import CachedAttention
from megatron_attnedit.attention.rope_tables import LAYOUTS


class MLAAttention(CachedAttention):
    name = "mla"
    cache_names = ("kv",)

    def __init__(self, attn, layer, config, options):
        super().__init__(attn, layer, config, options)
        self.heads = int(config.num_attention_heads)
        self.dn, self.dr = int(config.qk_nope_head_dim), int(config.qk_rope_head_dim)
        self.dv, self.r = int(config.v_head_dim), int(config.kv_lora_rank)
        self.scale = float(attn.scaling)
        interleave = config.model_type == "deepseek_v2" or bool(getattr(config, "rope_interleave", False))
        self.rope = LAYOUTS["interleaved" if interleave else "rotate_half"]
        # kv_b_proj.weight [heads * (dn + dv), r] -> W_UK [heads, dn, r], W_UV [heads, dv, r] (views)
        w = attn.kv_b_proj.weight.view(self.heads, self.dn + self.dv, self.r)
        self.w_uk, self.w_uv = w[:, : self.dn], w[:, self.dn :]
        self.kv = None

    def allocate(self, batch, max_len, device, dtype):
        self.kv = torch.zeros(batch, 1, max_len, self.r + self.dr, device=device, dtype=dtype)

    def _project(self, x, cos, sin):
        """q_nope [b, s, h, dn], q_pe [b, s, h, dr], latent [b, s, r], k_pe [b, s, dr]."""
        a = self.attn
        q = a.q_proj(x) if getattr(a, "q_proj", None) is not None else a.q_b_proj(a.q_a_layernorm(a.q_a_proj(x)))
        q_nope, q_pe = q.view(*x.shape[:2], self.heads, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        latent, k_pe = a.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        q_pe = self.rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
        return q_nope, q_pe, a.kv_a_layernorm(latent), self.rope(k_pe, cos, sin)

    def prefill(self, x, cos, sin):
        q_nope, q_pe, latent, k_pe = self._project(x, cos, sin)
        b, s = x.shape[:2]
        self.kv[:, 0, :s] = torch.cat([latent, k_pe], dim=-1)
        k_nope, v = self.attn.kv_b_proj(latent).view(b, s, self.heads, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, s, self.heads, self.dr)], dim=-1).transpose(1, 2)
        o = causal_attention(q, k, v.transpose(1, 2), self.scale)  # [b, h, s, dv]
        return self.attn.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.dv))

    def step(self, x, pos, cos, sin):
        q_nope, q_pe, latent, k_pe = self._project(x, cos, sin)
        b = x.shape[0]
        self.kv.index_copy_(2, pos, torch.cat([latent, k_pe], dim=-1).view(b, 1, 1, -1))
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope[:, 0], self.w_uk)  # W_UK absorbed
        q = torch.cat([q_lat, q_pe[:, 0]], dim=-1).unsqueeze(1)  # [b, 1, h, r + dr]: h queries of one key head
        o_lat = self._attend(q, self.kv, self.kv[..., : self.r], pos, self.scale)  # [b, 1, h, r]
        o = torch.einsum("bhr,hvr->bhv", o_lat[:, 0], self.w_uv)  # W_UV after the attention
        return self.attn.o_proj(o.reshape(b, 1, self.heads * self.dv))


ATTENTION = MLAAttention  # what the decode engine builds per layer
