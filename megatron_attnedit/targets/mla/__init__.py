"""MLA target: multi-head latent attention in the DeepSeek layout (DESIGN.md section 4).

Per MLA layer ("M" in the pattern; "G" keeps the teacher's GQA attention, copied): the keys and
values of every head are read out of one latent of ``kv_lora_rank`` per token plus one RoPE key of
``qk_pos_emb_head_dim`` shared by all heads, and only those are cached:
KV per token per layer = (kv_lora_rank + qk_pos_emb_head_dim) x bytes -- (512 + 64) x 2 = 1152 B
against 2 x 8 x 128 x 2 = 4096 B for Qwen3-8B's GQA.

This file: the options (resolved once against the teacher), layer kinds, KV formula, FLOP count
and how an export is recognised. model.py: megatron's MLASelfAttention spec and the initializers;
export.py: DeepSeek-V2; decode.py: the latent-cache decode.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families import head_dim, rope_theta
from megatron_attnedit.targets.base import AttentionTarget, LayerFlops, check_int, expand_pattern, gqa_layer_bytes, gqa_layer_flops, mean_keys

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")  # HF classes an MLA export loads into


@dataclasses.dataclass(frozen=True)
class MLAOptions:
    pattern: Union[str, Sequence[str]] = "M"  # M (MLA) / G (teacher GQA), tiled string or per-layer list
    init: str = "svd"  # svd | random
    q_lora_rank: Optional[int] = None  # None: full-rank query projection (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 512
    qk_head_dim: Optional[int] = None  # no-RoPE query/key width; None: the teacher's head_dim
    qk_pos_emb_head_dim: Optional[int] = None  # decoupled RoPE width; None: head_dim / 2
    v_head_dim: Optional[int] = None  # None: the teacher's head_dim
    rope_frequencies: str = "high"  # high | uniform: which teacher RoPE pairs the RoPE part keeps
    inherit_o_proj: bool = True
    calibration_tokens: int = 8192  # svd: training tokens whose teacher activations weight the factorisation; 0 = weights only
    kinds: Tuple[str, ...] = dataclasses.field(default=(), metadata={"derived": True})  # one letter per layer
    rotary_base: float = dataclasses.field(default=0.0, metadata={"derived": True})  # of the decoupled RoPE


class MLATarget(AttentionTarget):
    name = "mla"
    title = "MLA"
    Options = MLAOptions
    KINDS = {"M": "multi-head latent attention", "G": "the teacher's GQA attention"}
    weight_markers = ("linear_kv_down_proj", "linear_q_proj", "linear_q_down_proj")

    def resolve(self, hf_cfg: dict, options: dict) -> MLAOptions:
        o = super().resolve(hf_cfg, options)
        hd, hidden = head_dim(hf_cfg), int(hf_cfg["hidden_size"])
        o = dataclasses.replace(
            o,
            qk_head_dim=hd if o.qk_head_dim is None else o.qk_head_dim,
            qk_pos_emb_head_dim=hd // 2 if o.qk_pos_emb_head_dim is None else o.qk_pos_emb_head_dim,
            v_head_dim=hd if o.v_head_dim is None else o.v_head_dim,
            kinds=tuple(expand_pattern(o.pattern, hf_cfg["num_hidden_layers"], self.KINDS)),
        )
        if o.init not in ("svd", "random"):
            raise ConfigError(f"mla init {o.init!r} is unknown; use svd or random")
        if o.rope_frequencies not in ("high", "uniform"):
            raise ConfigError(f"rope_frequencies {o.rope_frequencies!r} is unknown; use high or uniform")
        check_int(o, "kv_lora_rank", 1, hidden, why=f" (at most hidden_size={hidden}: a wider latent cannot hold more)")
        if o.q_lora_rank is not None:
            check_int(o, "q_lora_rank", 1, hidden, why=f" (at most hidden_size={hidden}), or null for a full query projection")
        check_int(o, "qk_head_dim", 1)
        check_int(o, "calibration_tokens", 0)
        check_int(o, "v_head_dim", 1)
        dr = check_int(o, "qk_pos_emb_head_dim", 2, hd, why=f" (RoPE pairs taken from the teacher's head_dim={hd})")
        if dr % 2:
            raise ConfigError(f"qk_pos_emb_head_dim={dr} must be even (RoPE rotates pairs)")
        if o.rope_frequencies == "uniform" and hd % dr:
            raise ConfigError(f"rope_frequencies uniform needs qk_pos_emb_head_dim dividing head_dim={hd}, got {dr}")
        heads = int(hf_cfg["num_attention_heads"])
        if (o.inherit_o_proj or o.init == "svd") and heads * o.v_head_dim != heads * hd:
            raise ConfigError(
                f"heads x v_head_dim = {heads} x {o.v_head_dim} = {heads * o.v_head_dim} differs from the teacher's "
                f"o_proj input {heads * hd}; set v_head_dim={hd} or inherit_o_proj: false with init: random"
            )
        if o.init == "svd":
            if hf_cfg.get("attention_bias"):
                raise ConfigError("init svd does not factorise q/k/v biases (attention_bias: true); use init: random")
            if not o.inherit_o_proj:
                raise ConfigError("init svd reproduces the teacher's values, so it needs inherit_o_proj: true")
            if o.qk_head_dim < hd - dr:
                raise ConfigError(f"init svd needs qk_head_dim >= head_dim - qk_pos_emb_head_dim = {hd - dr} to hold the non-RoPE key part")
        # the decoupled RoPE keeps dr/2 of the teacher's pairs: the highest ones with base theta^(dr/hd)
        # (so its frequencies equal the teacher's unscaled ones), or every (hd/dr)-th with the teacher's base
        theta = rope_theta(hf_cfg)
        return dataclasses.replace(o, rotary_base=theta ** (dr / hd) if o.rope_frequencies == "high" else theta)

    def calibration_tokens(self, hf_cfg, options) -> int:
        o = self.resolve(hf_cfg, options)
        return o.calibration_tokens if o.init == "svd" else 0

    def layer_kinds(self, hf_cfg, options) -> List[str]:
        return list(self.resolve(hf_cfg, options).kinds)

    def kv_bytes_per_layer(self, hf_cfg, options, context, bytes_per_elem=2):
        o = self.resolve(hf_cfg, options)
        latent = float((o.kv_lora_rank + o.qk_pos_emb_head_dim) * bytes_per_elem)
        return [latent if k == "M" else float(gqa_layer_bytes(hf_cfg, bytes_per_elem)) for k in o.kinds]

    def flops(self, hf_cfg, options, seq) -> List[LayerFlops]:
        o = self.resolve(hf_cfg, options)
        h, nh = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
        qk, dr, v, r, ql = o.qk_head_dim, o.qk_pos_emb_head_dim, o.v_head_dim, o.kv_lora_rank, o.q_lora_rank
        q_proj = 2 * h * nh * (qk + dr) if not ql else 2 * (h * ql + ql * nh * (qk + dr))
        mla = LayerFlops(
            proj=q_proj + 2 * h * (r + dr) + 2 * r * nh * (qk + v) + 2 * nh * v * h,
            score=2 * mean_keys(seq) * nh * (qk + dr + v),
            input=(2 * h * nh * (qk + dr) if not ql else 2 * h * ql) + 2 * h * (r + dr),
            trained=True,
        )
        teacher = dataclasses.replace(gqa_layer_flops(hf_cfg, seq), trained=False)
        return [mla if k == "M" else teacher for k in o.kinds]

    def describe(self, hf_cfg, options) -> str:
        q = options.get("q_lora_rank")
        rope = options.get("qk_pos_emb_head_dim") or (head_dim(hf_cfg) // 2 if hf_cfg else "?")
        return f"MLA latent {options.get('kv_lora_rank', 512)} + rope {rope}" + (f", q_lora {q}" if q else "")

    def recognise(self, cfg):
        if cfg.get("model_type") not in MODEL_TYPES:
            return None
        return self.recorded_options(dict(
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_pos_emb_head_dim=int(cfg["qk_rope_head_dim"]),
            qk_head_dim=int(cfg["qk_nope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            q_lora_rank=cfg.get("q_lora_rank"),
        ))

    def recorded_options(self, options):
        # not an initialization: keeps the option checks to the shapes (an export's config has no
        # teacher head_dim to check v_head_dim against)
        return dict(options, init="random", inherit_o_proj=False)
