"""The MLA target on megatron-core: MLASelfAttention in the DeepSeek layout and the initializers.

Per MLA layer ("M" in the pattern; "G" keeps the teacher's GQA attention, copied):
  latent  c = RMSNorm(x W_dkv)      kv_lora_rank wide, cached    k_pe = RoPE(x W_kpe)  shared by all heads, cached
  key_h   = [c W_uk,h ; k_pe]       value_h = c W_uv,h           query_h = [x W_q,h (no RoPE) ; RoPE(x W_qr,h)]
  (q_lora_rank set: the query goes through its own RMSNormed latent as well), heads = teacher's,
  heads x v_head_dim = the teacher's o_proj input, so linear_proj is the teacher's o_proj.
KV cache per token per layer: (kv_lora_rank + qk_pos_emb_head_dim) x bytes -- (512 + 64) x 2 = 1152 B
against 2 x 8 x 128 x 2 = 4096 B for Qwen3-8B's GQA. Parameter names and layouts are DeepSeek's
(q_proj | q_a_proj/q_a_layernorm/q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj;
the RoPE part stored pair-interleaved, which megatron de-interleaves exactly as DeepSeek's code).

Qwen3's qk-norm (treatment). Qwen3 RMS-normalises every query and key head before RoPE:
k_g = g_k * (x W_k,g) / rms(x W_k,g), a per-head, per-token division that no latent can carry -- a
key read out of the shared latent by a linear map cannot be renormalised per head without leaving
the DeepSeek layout (and with it weight absorption and stock inference code). The student has no
q/k-norm: ``svd`` folds the norm weight g into the projections and replaces the per-token 1/rms by
one constant per head, s = E[rms] / E[rms^2] (the least-squares scale; from calibration inputs when
given, else from the weights assuming isotropic normalised inputs). That is the one approximation
of ``svd`` at full rank; tests/test_targets_mla.py pins the error it leaves on the toy model and
checks that everything else is exact.

``svd`` initializer (MHA2MLA / TransMLA style), computed on the full (TP-gathered) teacher weights
in float64, broadcast from TP rank 0 and sliced into this rank's shards:
* RoPE: the student keeps dr/2 of the teacher's hd/2 rotary frequency pairs in the decoupled part
  (``rope_frequencies: high`` keeps the highest ones with rotary base theta^(dr/hd), so its
  frequencies equal the teacher's; ``uniform`` keeps every (hd/dr)-th with the teacher's base).
  The teacher has one key per KV group, MLA one shared RoPE key: per frequency pair the shared key
  is the top principal direction over the groups, and each query head is scaled by its group's
  component, exact for one KV group. The other frequency pairs go to the no-RoPE part unrotated
  (position-free, the low frequencies for ``high``).
* K (no-RoPE part) and V of all groups are factorised jointly, W = U S V^T, in the coordinates of
  the input before the input_layernorm weight gamma (x = gamma * n, rms(n) = 1): W_dkv = V_r^T /
  gamma, W_ukv = U_r S_r. Then the latent V_r^T n has rms ~1 and at kv_lora_rank = hidden exactly
  rms(n) = 1, so DeepSeek's latent RMSNorm (weight 1) is a no-op where the factorisation is exact.
* Softmax scale: the student divides by sqrt(qk_head_dim + dr), the teacher by sqrt(head_dim);
  the query weights absorb the ratio.
``random`` (the paper): megatron's random init for everything but o_proj, which is inherited.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.common.embeddings import RotaryEmbedding
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region, scatter_to_sequence_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
    MultiLatentAttention,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_attnedit.attention.core import FlashCoreAttention
from megatron_attnedit.compat import DeepSeekNorms
from megatron_attnedit.families import mapping
from megatron_attnedit.families.mapping import Rule
from megatron_attnedit.families.table import gqa_attention_rules, shapes
from megatron_attnedit.families.base import INPUT_NORM, H, P
from megatron_attnedit.kernels import fusions
from megatron_attnedit.models.builder import LocalRMSNorm, gqa_attention_spec, scale_rope
from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families import head_dim, rope_theta

class RotarySelfAttention(SelfAttention):
    """The teacher's GQA attention for mixed MLA/GQA students. GPTModel computes no rotary
    embedding when the config says multi_latent_attention, and megatron's RoPE would then use the
    MLA (pair-interleaved) layout; this layer makes its own embedding with the teacher's base and
    applies RoPE in the teacher's layout, exactly as the teacher's layer does."""

    computes_own_rope = True

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal, hf_cfg=None, **kwargs):
        # kwargs: cp_comm_type, pg_collection (and from megatron-core 0.17 on name, pp_layer_offset)
        gqa_config = copy.copy(config)
        gqa_config.multi_latent_attention = False
        super().__init__(gqa_config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        self.own_rotary = RotaryEmbedding(
            self.config.kv_channels, rotary_percent=1.0, rotary_base=rope_theta(hf_cfg), use_cpu_initialization=self.config.use_cpu_initialization
        )
        scale_rope(self.own_rotary, hf_cfg)  # the teacher's RoPE scaling, if its family has one

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if kwargs.get("rotary_pos_emb") is None:
            seq = hidden_states.size(0) * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
            kwargs["rotary_pos_emb"] = self.own_rotary(seq)
        return super().forward(hidden_states, attention_mask, **kwargs)


class LocalMLASelfAttention(DeepSeekNorms, MLASelfAttention):
    """megatron's MLASelfAttention with DeepSeek's latent norms as the local spec names them (the
    KV norm always, the Q norm with q_lora_rank), on every supported megatron-core (compat.py)."""


class FusedMLASelfAttention(LocalMLASelfAttention):
    """megatron's MLASelfAttention (``model.kernel_fusion``) whose plain training path -- any TP,
    with or without sequence parallelism, CP=1, no packed sequences, no inference cache, no
    up-projection recompute, ``rope`` RoPE, a device ``fusions.DEVICES`` compiles for -- builds
    query, key and value from the up-projections in one compiled kernel (``fusions.mla_qkv``);
    every other case, and everything else, is megatron's. Same parameters, same math, same TP/SP
    communication as megatron's ``get_query_key_value_tensors`` (tests/test_fusions.py: logits and
    gradients at TP=1, and at TP=2 with and without sequence parallelism and q_lora)."""

    def _fuses(self, hidden_states, key_value_states, packed_seq_params, inference_context) -> bool:
        c = self.config
        return (
            fusions.compiles(hidden_states) and key_value_states is None and packed_seq_params is None
            and inference_context is None and c.rope_type == "rope" and not self.recompute_up_proj
            and not self.cache_mla_latents and self.pg_collection.cp.size() == 1
        )

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, position_ids=None, packed_seq_params=None, inference_context=None, *, inference_params=None):
        if not self._fuses(hidden_states, key_value_states, packed_seq_params, inference_context or inference_params):
            return super().get_query_key_value_tensors(hidden_states, key_value_states, position_ids, packed_seq_params,
                                                       inference_context=inference_context, inference_params=inference_params)
        c, tp = self.config, self.pg_collection.tp
        sp = c.sequence_parallel and tp.size() > 1
        # The down-projections are column-parallel: at TP > 1 each rank holds a slice of the latent
        # (for every token under SP, the layer gathering the sequence), gathered whole here; under
        # SP the latent that feeds a norm then goes back to this rank's sequence shard.
        if c.q_lora_rank is None:
            q_compressed = hidden_states
            q, _ = self.linear_q_proj(hidden_states)
        else:
            q_compressed, _ = self.linear_q_down_proj(hidden_states)
            if q_compressed.size(-1) != c.q_lora_rank:
                q_compressed = gather_from_tensor_model_parallel_region(q_compressed, group=tp)
            if sp:
                q_compressed = scatter_to_sequence_parallel_region(q_compressed, group=tp)
            q_compressed = self.q_layernorm(q_compressed)
            q, _ = self.linear_q_up_proj(q_compressed)
        kv_combined, _ = self.linear_kv_down_proj(hidden_states)
        if kv_combined.size(-1) != c.kv_lora_rank + c.qk_pos_emb_head_dim:
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=tp)
        kv_compressed, k_pos_emb = torch.split(kv_combined, [c.kv_lora_rank, c.qk_pos_emb_head_dim], dim=-1)
        if sp:  # k_pos_emb stays whole: the shared RoPE key is needed for every token
            kv_compressed = scatter_to_sequence_parallel_region(kv_compressed, group=tp)
        kv_compressed = self.kv_layernorm(kv_compressed)
        kv, _ = self.linear_kv_up_proj(kv_compressed)
        n = self.num_attention_heads_per_partition
        query, key, value = fusions.compiled(fusions.mla_qkv)(
            q.view(*q.shape[:-1], n, self.q_head_dim), kv.view(*kv.shape[:-1], n, c.qk_head_dim + c.v_head_dim),
            k_pos_emb.unsqueeze(-2), self.rotary_pos_emb(q.shape[0]), c.qk_head_dim, c.v_head_dim, c.rotary_interleaved,
        )
        return query, key, value, q_compressed, kv_compressed


def validate_layout(target, hf_cfg, options, build_opts):
    o = target.resolve(hf_cfg, options)
    tp = build_opts.tensor_model_parallel_size
    if build_opts.spec != "local":
        raise ConfigError("mla needs the local spec (spec: local)")
    width = o.kv_lora_rank + o.qk_pos_emb_head_dim
    if width % tp:
        raise ConfigError(f"TP={tp} must divide kv_lora_rank + qk_pos_emb_head_dim = {width} (the latent projection is split over TP)")
    if o.q_lora_rank is not None and o.q_lora_rank % tp:
        raise ConfigError(f"TP={tp} must divide q_lora_rank={o.q_lora_rank}")


def config_overrides(target, hf_cfg, options):
    o = target.resolve(hf_cfg, options)
    return MLATransformerConfig, dict(
        multi_latent_attention=True,
        q_lora_rank=o.q_lora_rank,
        kv_lora_rank=o.kv_lora_rank,
        qk_head_dim=o.qk_head_dim,
        qk_pos_emb_head_dim=o.qk_pos_emb_head_dim,
        v_head_dim=o.v_head_dim,
        rope_type="rope",
        rotary_base=o.rotary_base,
        rotary_percent=1.0,
        rotary_scaling_factor=1.0,
        mscale=1.0,
        mscale_all_dim=0.0,
    )


def attention_spec(target, layer, hf_cfg, options, build_opts):
    if target.resolve(hf_cfg, options).kinds[layer] == "G":
        spec = gqa_attention_spec(build_opts, hf_cfg)
        return ModuleSpec(
            module=RotarySelfAttention,
            params=dict(spec.params, hf_cfg=hf_cfg),
            submodules=spec.submodules,
        )
    backend = LocalSpecProvider()
    norm = LocalRMSNorm
    col = backend.column_parallel_linear()
    return ModuleSpec(
        module=FusedMLASelfAttention if build_opts.kernel_fusion else LocalMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=col,
            linear_q_down_proj=col,
            linear_q_up_proj=col,
            linear_kv_down_proj=col,
            linear_kv_up_proj=col,
            core_attention=FlashCoreAttention,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=norm,
            kv_layernorm=norm,
        ),
    )


def attention_rules(target, layer, hf_cfg, options):
    o = target.resolve(hf_cfg, options)
    if o.kinds[layer] == "G":
        return gqa_attention_rules(hf_cfg)
    a, h = P + "self_attention.", H + "self_attn."
    rules = [INPUT_NORM]
    if o.q_lora_rank is None:
        rules.append(Rule(a + "linear_q_proj.weight", (h + "q_proj.weight",), "copy", 0))
    else:
        rules += [
            Rule(a + "linear_q_down_proj.weight", (h + "q_a_proj.weight",), "copy", 0),
            Rule(a + "q_layernorm.weight", (h + "q_a_layernorm.weight",)),
            Rule(a + "linear_q_up_proj.weight", (h + "q_b_proj.weight",), "copy", 0),
        ]
    rules += [
        Rule(a + "linear_kv_down_proj.weight", (h + "kv_a_proj_with_mqa.weight",), "copy", 0),
        Rule(a + "kv_layernorm.weight", (h + "kv_a_layernorm.weight",)),
        Rule(a + "linear_kv_up_proj.weight", (h + "kv_b_proj.weight",), "copy", 0),
        Rule(a + "linear_proj.weight", (h + "o_proj.weight",), "copy", 1),
    ]
    return rules


def trainable_attention_params(target, layer_module):
    attn = layer_module.self_attention
    return list(attn.parameters()) if isinstance(attn, MultiLatentAttention) else []


@torch.no_grad()
def init_from_teacher(target, student_attn, teacher_attn, layer, hf_cfg, options, input_norm_weight=None, calibration=None, **extra):
    """``input_norm_weight``: the layer's input_layernorm weight (gamma; ones if None).
    ``calibration``: the teacher's normalised inputs of this layer, [..., hidden] (optional;
    used for the qk-norm scales, the latent norm weight and the shared RoPE key)."""
    o = target.resolve(hf_cfg, options)
    if not isinstance(student_attn, MultiLatentAttention):  # a G layer: the teacher's attention
        student_attn.load_state_dict(teacher_attn.state_dict())
        return
    if o.inherit_o_proj:
        student_attn.linear_proj.weight.copy_(teacher_attn.linear_proj.weight)
    if o.init == "random":
        return
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    qkv = _gather_rows(teacher_attn.linear_qkv.weight, group, tp)
    wq, wk, wv = mapping.to_hf(Rule("", (), "qkv", 0), qkv, shapes(hf_cfg))
    eps = float(hf_cfg.get("rms_norm_eps", 1e-6))
    full = svd_student_weights(
        wq, wk, wv, getattr(teacher_attn.q_layernorm, "weight", None), getattr(teacher_attn.k_layernorm, "weight", None),
        input_norm_weight, calibration, hf_cfg, o, eps,
    )
    for name, w in full.items():
        param = student_attn.get_parameter(name)
        w = _broadcast_from_tp0(w.to(param.device, torch.float32).contiguous(), group, tp)
        shard = torch.chunk(w, tp, dim=0)[rank] if name.startswith("linear_") else w
        if tuple(shard.shape) != tuple(param.shape):
            raise RuntimeError(f"mla svd init: {name} computed {tuple(shard.shape)}, module has {tuple(param.shape)}")
        param.copy_(shard.to(param.dtype))


# --------------------------------------------------------------------------------------------
# The svd initializer on full tensors (no megatron, no distribution; float64)
# --------------------------------------------------------------------------------------------


def selected_pairs(hd: int, dr: int, mode: str) -> List[int]:
    """Teacher RoPE pair indices j (dims j and j + hd/2) kept in the student's RoPE part, in order."""
    n = dr // 2
    return list(range(n)) if mode == "high" else [i * (hd // dr) for i in range(n)]


def qk_norm_scales(w_heads: torch.Tensor, gamma: torch.Tensor, calib: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Per head, the constant s minimising E || s W x - W x / rms(W x) ||^2, i.e. E[rms] / E[rms^2].
    w_heads [n, hd, d]; calib [N, d] normalised inputs, or None for isotropic inputs (x = gamma n,
    E[n n^T] = I), where rms^2 concentrates at ||W diag(gamma)||_F^2 / hd."""
    hd = w_heads.shape[1]
    if calib is None:
        ms = (w_heads * gamma.view(1, 1, -1)).pow(2).sum(dim=(1, 2)) / hd
        return 1.0 / torch.sqrt(ms + eps)
    y = torch.einsum("nkd,td->ntk", w_heads, calib)
    rms = torch.sqrt(y.pow(2).mean(-1) + eps)  # [n, N]
    return rms.mean(-1) / rms.pow(2).mean(-1)


def _low_rank(m: torch.Tensor, gamma: torch.Tensor, rank: int, calib: Optional[torch.Tensor] = None):
    """(down [rank, d], up [rows, rank]) with up @ down @ x ~ m @ x for the layer's inputs x.

    Without calibration the inputs are taken as isotropic after the norm (x = gamma * n,
    E[n n^T] = I): the factorisation is done on m diag(gamma), so that down x = V_r^T n has
    orthonormal rows and rms ~1 (exactly 1 at full rank).

    With calibration inputs ``calib`` [N, d] it is activation-aware (SVD-LLM style): the error
    E || (m - up down) x ||^2 = || (m - up down) C^(1/2) ||_F^2, C = E[x x^T], is minimised by the
    SVD of m C^(1/2) = U S V^T. The latent is then taken as S_r V_r^T C^(-1/2) x / rms(S_r), up =
    U_r * rms(S_r): its norm follows the norm of the (rank-r) output m x, token by token, rather
    than that of a whitened input, whose per-token rms the latent RMSNorm would divide out as noise.
    On the bundled teacher (kv_lora_rank 96 + RoPE 32, mean per-layer NMSE of the attention output at
    init on 2,048 held-out tokens; the other calibrated pieces on in both) this takes 0.58 (isotropic)
    to 0.43 with 4,096 calibration tokens and 0.41 with the default 8,192; the whitened latent
    (down = V_r^T C^(-1/2)) gave 1.20."""
    if calib is None:
        mn = m * gamma.view(1, -1)
        u, s, vh = torch.linalg.svd(mn, full_matrices=True)
        k = min(rank, s.numel())
        up = m.new_zeros(m.shape[0], rank)
        up[:, :k] = u[:, :k] * s[:k]
        return vh[:rank] / gamma.view(1, -1), up
    cov = calib.T @ calib / calib.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals + 0.01 * evals.mean().clamp_min(1e-30)  # 1% damping: directions the calibration barely saw stay tame
    root, inv_root = (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T
    u, s, vh = torch.linalg.svd(m @ root, full_matrices=True)
    k = min(rank, s.numel())
    scale = m.new_ones(rank)
    scale[:k] = s[:k] / s[:k].pow(2).mean().sqrt().clamp_min(1e-30)
    up = m.new_zeros(m.shape[0], rank)
    up[:, :k] = u[:, :k] * (s[:k] / scale[:k])
    return (vh[:rank] @ inv_root) * scale.view(-1, 1), up


def _latent_norm_weight(down: torch.Tensor, calib: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm weight of a latent: 1 for isotropic inputs, else the mean rms of the latent (the
    least-squares value, so normalising changes the latent as little as possible on average)."""
    if calib is None:
        return down.new_ones(down.shape[0])
    lat = calib @ down.T
    return torch.sqrt(lat.pow(2).mean(-1) + eps).mean().expand(down.shape[0]).clone()


def svd_student_weights(wq, wk, wv, q_norm_w, k_norm_w, gamma, calib, hf_cfg, o, eps) -> Dict[str, torch.Tensor]:
    """Full (unsharded) MLA weights from the teacher's full projections; names are the MLA module's."""
    # On a CUDA GPU where the teacher lives (a Qwen3-8B layer's fp64 factorisations: seconds there, minutes on
    # a CPU); elsewhere (CPU, Ascend, whose fp64 linalg support we have not verified) on the CPU.
    dev = wq.device if wq.device.type == "cuda" else torch.device("cpu")
    f = lambda t: None if t is None else t.detach().to(dev, torch.float64)
    wq, wk, wv, q_norm_w, k_norm_w = map(f, (wq, wk, wv, q_norm_w, k_norm_w))
    heads, groups, hd, d = int(hf_cfg["num_attention_heads"]), int(hf_cfg["num_key_value_heads"]), head_dim(hf_cfg), int(hf_cfg["hidden_size"])
    per = heads // groups
    dn, dr, dv, r = o.qk_head_dim, o.qk_pos_emb_head_dim, o.v_head_dim, o.kv_lora_rank
    gamma = torch.ones(d, dtype=torch.float64, device=dev) if gamma is None else f(gamma)
    tiny = 1e-6 * gamma.abs().max()
    gamma = torch.where(gamma.abs() < tiny, torch.where(gamma < 0, -tiny, tiny), gamma)
    x = None if calib is None else f(calib).reshape(-1, d)

    wq_h = wq.view(heads, hd, d)
    wk_g = wk.view(groups, hd, d)
    # Linearised qk-norm: g * W x * s (one constant per head / group); a family without q/k-norm
    # (Llama) has nothing to linearise: its projections are taken as they are.
    q_t, k_t = wq_h, wk_g
    if q_norm_w is not None:
        q_t = q_t * q_norm_w.view(1, hd, 1) * qk_norm_scales(wq_h, gamma, x, eps).view(heads, 1, 1)
    if k_norm_w is not None:
        k_t = k_t * k_norm_w.view(1, hd, 1) * qk_norm_scales(wk_g, gamma, x, eps).view(groups, 1, 1)
    q_t = q_t * math.sqrt(dn + dr) / math.sqrt(hd)
    v_g = wv.view(groups, hd, d)

    pairs = selected_pairs(hd, dr, o.rope_frequencies)
    rest = [j for j in range(hd // 2) if j not in set(pairs)]
    rest_dims = rest + [j + hd // 2 for j in rest]

    # Shared RoPE key: per kept pair, the top principal direction over the KV groups.
    k_pe = torch.zeros(dr, d, dtype=torch.float64, device=dev)
    q_pe = torch.zeros(heads, dr, d, dtype=torch.float64, device=dev)
    for i, j in enumerate(pairs):
        rows = k_t[:, [j, j + hd // 2], :]  # [groups, 2, d]
        if x is None:
            proj = rows * gamma.view(1, 1, -1)
            cov = torch.einsum("gpd,hpd->gh", proj, proj)
        else:
            y = torch.einsum("gpd,td->gpt", rows, x)
            cov = torch.einsum("gpt,hpt->gh", y, y)
        u = torch.linalg.eigh(cov).eigenvectors[:, -1]
        u = u if u.sum() >= 0 else -u
        k_pe[2 * i : 2 * i + 2] = torch.einsum("g,gpd->pd", u, rows)
        for hh in range(heads):
            q_pe[hh, 2 * i : 2 * i + 2] = u[hh // per] * q_t[hh, [j, j + hd // 2], :]

    # Query: [no-RoPE (rest dims, zero-padded to dn) ; RoPE part] per head.
    q_full = torch.zeros(heads, dn + dr, d, dtype=torch.float64, device=dev)
    q_full[:, : len(rest_dims)] = q_t[:, rest_dims, :]
    q_full[:, dn:] = q_pe
    q_full = q_full.reshape(heads * (dn + dr), d)

    # Joint low-rank K (no-RoPE part) and V of all groups.
    nr = len(rest_dims)
    m = torch.cat([k_t[:, rest_dims, :].reshape(groups * nr, d), v_g.reshape(groups * hd, d)], dim=0)
    down, up = _low_rank(m, gamma, r, x)
    up_k, up_v = up[: groups * nr].view(groups, nr, r), up[groups * nr :].view(groups, hd, r)
    kv_up = torch.zeros(heads, dn + dv, r, dtype=torch.float64, device=dev)
    for hh in range(heads):
        kv_up[hh, :nr] = up_k[hh // per]
        kv_up[hh, dn:] = up_v[hh // per]
    out = {
        "linear_kv_down_proj.weight": torch.cat([down, k_pe], dim=0),
        "kv_layernorm.weight": _latent_norm_weight(down, x, eps),
        "linear_kv_up_proj.weight": kv_up.reshape(heads * (dn + dv), r),
    }
    if o.q_lora_rank is None:
        out["linear_q_proj.weight"] = q_full
    else:
        q_down, q_up = _low_rank(q_full, gamma, o.q_lora_rank, x)
        out["linear_q_down_proj.weight"] = q_down
        out["q_layernorm.weight"] = _latent_norm_weight(q_down, x, eps)
        out["linear_q_up_proj.weight"] = q_up
    return out


def _gather_rows(w: torch.Tensor, group, tp: int) -> torch.Tensor:
    if tp == 1:
        return w.detach()
    parts = [torch.empty_like(w) for _ in range(tp)]
    dist.all_gather(parts, w.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _broadcast_from_tp0(w: torch.Tensor, group, tp: int) -> torch.Tensor:
    """Every TP rank computed the same thing; make it bit-identical regardless of the LAPACK build."""
    if tp == 1:
        return w
    dist.broadcast(w, src=dist.get_global_rank(group, 0), group=group)
    return w
