"""MLA decode of a DeepSeek-V2/V3 Hugging Face checkpoint: latent cache, absorbed up-projections.

Per layer and token the cache holds only the normalised KV latent c (kv_lora_rank wide) and the
RoPE'd key k_pe shared by all heads (qk_rope_head_dim wide): (512 + 64) x 2 B = 1152 B per token
per layer in bf16 for the project's MLA students. kv_b_proj = per head [W_UK,h ; W_UV,h]
(qk_nope_head_dim + v_head_dim rows, kv_lora_rank columns) is never applied to the cache:

  score_h(i, j) = q_nope_h(i) . (W_UK,h c_j) + q_pe_h(i) . k_pe(j)
               = (W_UK,h^T q_nope_h(i)) . c_j + q_pe_h(i) . k_pe(j)      W_UK absorbed into the query
  out_h(i)     = sum_j p_h(i, j) W_UV,h c_j = W_UV,h (sum_j p_h(i, j) c_j)  W_UV applied once, after

so a step costs O(T x heads x (kv_lora_rank + qk_rope_head_dim)) in attention whatever
qk_nope_head_dim and v_head_dim are. The stock transformers code (5.x) also caches the latent but
re-expands every cached token through kv_b_proj at every step (O(T x kv_lora_rank x heads x
(qk_nope + v))); ``verify_against_stock`` checks that both give the same logits.

Everything but the attention (embeddings, norms, dense MLP or MoE, lm_head, the RoPE tables and
RoPE layout) is the stock model's own modules and functions, called as they are.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import torch

from megatron_attnedit.eval import EvalError

MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


class LatentCache:
    """Per layer: the latent [b, T, kv_lora_rank] and the RoPE key [b, T, qk_rope_head_dim]."""

    def __init__(self, num_layers: int):
        self.latent: List[Optional[torch.Tensor]] = [None] * num_layers
        self.k_pe: List[Optional[torch.Tensor]] = [None] * num_layers

    def append(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor):
        if self.latent[layer] is None:
            self.latent[layer], self.k_pe[layer] = latent, k_pe
        else:
            self.latent[layer] = torch.cat([self.latent[layer], latent], dim=1)
            self.k_pe[layer] = torch.cat([self.k_pe[layer], k_pe], dim=1)
        return self.latent[layer], self.k_pe[layer]

    def get_seq_length(self) -> int:
        return 0 if self.latent[0] is None else self.latent[0].shape[1]

    def bytes_per_layer(self) -> List[int]:
        return [sum(t.numel() * t.element_size() for t in (c, k) if t is not None) for c, k in zip(self.latent, self.k_pe)]


class AbsorbedMLA:
    """Runs a loaded ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` with ``LatentCache``."""

    def __init__(self, model):
        cfg = model.config
        if getattr(cfg, "model_type", None) not in MLA_MODEL_TYPES:
            raise EvalError(f"absorbed MLA decode needs a DeepSeek-V2/V3 checkpoint, got model_type {getattr(cfg, 'model_type', None)!r}")
        self.model, self.inner, self.cfg = model, model.model, cfg
        self._modeling = sys.modules[type(model).__module__]  # the stock RoPE functions of this family
        self.heads = cfg.num_attention_heads
        self.dn, self.dr, self.dv, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        # kv_b_proj.weight [heads * (dn + dv), r] -> W_UK [heads, dn, r], W_UV [heads, dv, r] (views)
        self.w_uk, self.w_uv = [], []
        for layer in self.inner.layers:
            w = layer.self_attn.kv_b_proj.weight.view(self.heads, self.dn + self.dv, self.r)
            self.w_uk.append(w[:, : self.dn])
            self.w_uv.append(w[:, self.dn :])

    def new_cache(self) -> LatentCache:
        return LatentCache(len(self.inner.layers))

    def _rope(self, q_pe, k_pe, pos_emb):
        """The stock layout: V2 rotates interleaved pairs with complex factors; V3 with cos/sin,
        interleaved when ``rope_interleave`` (its default), else rotate_half."""
        m = self._modeling
        if self.cfg.model_type == "deepseek_v2":
            return m.apply_rotary_emb(q_pe, k_pe, pos_emb.to(q_pe.device))
        cos, sin = pos_emb
        if getattr(self.cfg, "rope_interleave", False):
            return m.apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)
        return m.apply_rotary_pos_emb(q_pe, k_pe, cos, sin)

    def _attention(self, i: int, attn, x: torch.Tensor, pos_emb, cache: LatentCache) -> torch.Tensor:
        b, s, _ = x.shape
        if attn.q_lora_rank is None:
            q = attn.q_proj(x)
        else:
            q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
        q = q.view(b, s, self.heads, self.dn + self.dr).transpose(1, 2)  # [b, h, s, dn + dr]
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        latent, k_pe = attn.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        latent = attn.kv_a_layernorm(latent)
        q_pe, k_pe = self._rope(q_pe, k_pe.view(b, 1, s, self.dr), pos_emb)
        c, kr = cache.append(i, latent, k_pe.view(b, s, self.dr))  # [b, T, r], [b, T, dr]
        t = c.shape[1]
        q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, self.w_uk[i])  # W_UK absorbed
        scores = (torch.matmul(q_lat, c.unsqueeze(1).transpose(-1, -2)) + torch.matmul(q_pe, kr.unsqueeze(1).transpose(-1, -2))) * attn.scaling
        if s > 1:  # new query k sits at position t - s + k and sees keys 0 .. t - s + k
            future = torch.arange(t, device=x.device)[None, :] > torch.arange(t - s, t, device=x.device)[:, None]
            scores = scores.masked_fill(future, float("-inf"))
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(c.dtype)
        o_lat = torch.matmul(p, c.unsqueeze(1))  # [b, h, s, r]
        o = torch.einsum("bhsr,hvr->bshv", o_lat, self.w_uv[i])  # W_UV absorbed
        return attn.o_proj(o.reshape(b, s, self.heads * self.dv))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """Logits [b, s, vocab] of ``input_ids`` [b, s] following the cached tokens; extends ``cache``."""
        b, s = input_ids.shape
        p0 = cache.get_seq_length()
        pos = torch.arange(p0, p0 + s, device=input_ids.device).unsqueeze(0).expand(b, -1)
        h = self.inner.embed_tokens(input_ids)
        pos_emb = self.inner.rotary_emb(h, pos)
        for i, layer in enumerate(self.inner.layers):
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), pos_emb, cache)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(self.inner.norm(h))


@torch.no_grad()
def verify_against_stock(model, tokens: torch.Tensor, step_logits: torch.Tensor, prompt_len: int) -> dict:
    """Teacher-forced check of an absorbed decode: the stock forward (no cache) over the decoded
    sequence ``tokens`` [1, T] must give the logits the absorbed decode produced at each step
    (``step_logits`` [n, vocab] for positions prompt_len-1 .. prompt_len+n-2) and the same greedy
    tokens. Returns max |diff|, the largest |logit| and whether all next tokens agree."""
    n = step_logits.shape[0]
    ref = model(tokens[:, : prompt_len + n - 1]).logits[0, prompt_len - 1 :].float()
    got = step_logits.float()
    return dict(
        max_abs_diff=float((ref - got).abs().max()),
        max_abs_logit=float(ref.abs().max()),
        tokens_equal=bool(torch.equal(ref.argmax(-1), got.argmax(-1))),
        steps=n,
    )
