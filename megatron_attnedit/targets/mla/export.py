"""MLA students exported as DeepSeek-V2 (``deepseek_v2`` / ``DeepseekV2ForCausalLM``): stock
transformers, no remote code -- the class vLLM and SGLang serve MLA with.

Why DeepSeek-V2 and not V3 (transformers 5.23): V3's router is sigmoid scores + a correction bias
+ group-limited top-k, which cannot express Qwen3-MoE's softmax router. V2's router is softmax
over all experts then greedy top-k, Qwen3-MoE's exactly. Renormalising the top-k weights
(``norm_topk_prob``, true for Qwen3-30B-A3B) is honoured by vLLM, SGLang and DeepSeek's own
modeling code, but transformers' DeepseekV2 drops the flag (5.23 removes it from its router), so
under transformers a norm_topk_prob student's routed weights are not renormalised; we warn.
"""

from __future__ import annotations

from megatron_attnedit import families
from megatron_attnedit.errors import CheckpointError
from megatron_attnedit.targets.base import HFExport


def _dense_prefix(cfg: dict, where: str) -> int:
    """first_k_dense_replace: the number of leading dense layers, when the rest are all MoE."""
    moe = families.moe_layer_pattern(cfg)
    k = moe.index(1) if 1 in moe else len(moe)
    if any(moe[:k]) or not all(moe[k:]):
        dense = [i for i, m in enumerate(moe) if not m]
        raise CheckpointError(
            f"{where}: dense layers {dense} (mlp_only_layers / decoder_sparse_step) are not a prefix of the model; "
            "DeepSeek-V2's first_k_dense_replace can only make the first k layers dense, so this MoE student has no DeepSeek format"
        )
    return k


def hf_export(t, cfg: dict, target, table, where: str) -> HFExport:
    """The student in DeepSeek-V2's format (see the module docstring)."""
    o = t.resolve(cfg, target.options)
    kinds = o.kinds
    if "G" in kinds:
        raise CheckpointError(
            f"{where}: this MLA student keeps the teacher's GQA attention in layers {[i for i, k in enumerate(kinds) if k == 'G']} "
            "(pattern with G); a DeepSeek-V2 checkpoint has MLA in every layer, so only all-MLA students (pattern: M) export"
        )
    if cfg.get("attention_bias"):
        raise CheckpointError(f"{where}: attention_bias is true; the MLA student has no attention biases to export")
    n = int(cfg["num_hidden_layers"])
    k = _dense_prefix(cfg, where)
    # The decoupled RoPE rotates qk_pos_emb_head_dim dims with base theta' (theta^(dr/hd) for
    # rope_frequencies: high): DeepSeek's default rope over its qk_rope_head_dim with that theta.
    theta = float(o.rotary_base)
    out = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": n,
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_attention_heads"],  # MLA: every head reads the shared latent
        "hidden_act": "silu",
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "initializer_range": cfg.get("initializer_range", 0.02),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "use_cache": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "q_lora_rank": o.q_lora_rank,
        "kv_lora_rank": o.kv_lora_rank,
        "qk_nope_head_dim": o.qk_head_dim,
        "qk_rope_head_dim": o.qk_pos_emb_head_dim,
        "v_head_dim": o.v_head_dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,  # read by transformers 4.x-era configs / engines
        "rope_scaling": None,
        "first_k_dense_replace": k,
        "n_shared_experts": 0,  # Qwen3 has none (transformers wants an int; the tensors are 0-wide)
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"):
        if key in cfg:
            out[key] = cfg[key]
    zero, notes = [], []
    if k < n:
        # The router: Qwen3-MoE's softmax over all experts, then top-k. In DeepSeek-V2's terms that
        # is greedy top-k in one group holding every expert (n_group 1, that group always chosen):
        # vLLM / SGLang run their grouped top-k with these, which then selects among all experts.
        out.update(
            routed_scaling_factor=1.0,
            scoring_func="softmax",
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            n_routed_experts=families.num_experts(cfg),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        )
        h = int(cfg["hidden_size"])
        for i in range(k, n):
            p = f"model.layers.{i}.mlp.shared_experts."
            zero += [(p + "gate_proj.weight", (0, h)), (p + "up_proj.weight", (0, h)), (p + "down_proj.weight", (h, 0))]
        if out["norm_topk_prob"]:
            notes.append(
                "note: norm_topk_prob is true: vLLM, SGLang and DeepSeek's own code renormalise the top-k routing weights as "
                "Qwen3-MoE does; transformers' DeepseekV2ForCausalLM (<= 5.23) ignores the flag, so its outputs differ slightly"
            )
    else:
        # first_k_dense_replace = all layers: every MLP dense, no router, so no routing keys (an
        # expert-group count without experts is refused by llama.cpp's loader)
        out.update(n_routed_experts=0, num_experts_per_tok=None)
    if float(out["rms_norm_eps"]) != 1e-6:
        notes.append(f"note: transformers' DeepSeek-V2 normalises the latents with eps 1e-6, the student with rms_norm_eps {out['rms_norm_eps']}")
    _check_stock_config(out, where)
    return HFExport(target=target, table=table, hf_config=out, zero_tensors=tuple(zero), notes=tuple(notes))


def _check_stock_config(cfg: dict, where: str) -> None:
    """The config loads with the stock transformers class (fails here, before writing, if not)."""
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**cfg)
    except Exception as e:  # transformers' validation errors have no common base class
        raise CheckpointError(f"{where}: the exported {cfg['model_type']} config is rejected by transformers: {str(e).splitlines()[0]}") from None
