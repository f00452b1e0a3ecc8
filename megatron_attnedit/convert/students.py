"""Hugging Face formats of students: what ``mcore_to_hf`` writes for a checkpoint whose metadata
names an attention target.

  mla       DeepSeek-V2 (``deepseek_v2`` / ``DeepseekV2ForCausalLM``): stock transformers, no
            remote code -- the class vLLM and SGLang serve MLA with.
  gate_swa  Qwen3 / Qwen3-MoE plus the gate, window, sinks and layer pattern (``qwen3_gateswa`` /
            ``qwen3_moe_gateswa``), loaded through ``auto_map`` from ``configuration_gateswa.py`` and
            ``modeling_gateswa.py`` shipped next to the weights (``trust_remote_code=True``).
  gqa       the teacher's own Qwen3 format.

The student's checkpoint metadata (written by ``training/checkpoint.py``): ``target`` = the target's
name (or ``{"name", "options"}``), ``target_options`` = its options. Both are checked here, before
anything is read or written; that they match the tensors is checked by the caller, which builds
the student's layout from them and compares every shape.

Why DeepSeek-V2 and not V3 (transformers 5.23): V3's router is sigmoid scores + a correction bias
+ group-limited top-k, which cannot express Qwen3-MoE's softmax router. V2's router is softmax
over all experts then greedy top-k, Qwen3-MoE's exactly. Renormalising the top-k weights
(``norm_topk_prob``, true for Qwen3-30B-A3B) is honoured by vLLM, SGLang and DeepSeek's own
modeling code, but transformers' DeepseekV2 drops the flag (5.23 removes it from its router), so
under transformers a norm_topk_prob student's routed weights are not renormalised; we warn.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, List, Optional, Tuple

import torch

from megatron_attnedit.errors import CheckpointError

GATESWA_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_gateswa")
GATESWA_FILES = ("configuration_gateswa.py", "modeling_gateswa.py")
# teacher model_type -> the class name prefix of its GateSWA classes in hf_gateswa/ (model_type <teacher>_gateswa)
GATESWA_CLASSES = {"qwen3": "GateSWA", "qwen3_moe": "GateSWAMoe", "llama": "GateSWALlama"}

# Substrings of megatron weight names that only a student has: what tells a student's weights
# apart from the teacher's when the metadata names no target.
_STUDENT_MARKERS = {
    "linear_kv_down_proj": "mla",
    "linear_q_proj": "mla",
    "linear_q_down_proj": "mla",
    "linear_gate": "gate_swa",
    "softmax_offset": "gate_swa",
}


@dataclasses.dataclass
class StudentExport:
    """Everything ``mcore_to_hf`` needs that differs from the teacher's export."""

    target: object  # TargetConfig
    table: object  # ModelTable of the student
    hf_config: dict  # config.json
    code_files: Tuple[str, ...] = ()  # source files copied next to the weights
    zero_tensors: List[Tuple[str, Tuple[int, ...]]] = dataclasses.field(default_factory=list)  # written as zeros
    transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t  # per HF tensor
    notes: List[str] = dataclasses.field(default_factory=list)  # printed to stderr, one line each


def target_from_metadata(meta: dict, where: str):
    """The checkpoint's TargetConfig (options validated against the stored config), or None for a teacher."""
    from megatron_attnedit.attention.targets import REGISTRY, TargetConfig, get_target
    from megatron_attnedit.errors import ConfigError

    t, options = meta.get("target"), meta.get("target_options")
    if not t:
        if options:
            raise CheckpointError(f"{where}: the metadata has target_options but no target name; it is inconsistent")
        return None
    if options is not None and not isinstance(options, dict):
        raise CheckpointError(f"{where}: the metadata's target_options {options!r} are not a mapping")
    if isinstance(t, dict):
        name, opts = t.get("name"), dict(t.get("options") or {})
        opts.update(options or {})
    elif isinstance(t, str):
        name, opts = t, dict(options or {})
    else:
        raise CheckpointError(f"{where}: the metadata's target {t!r} is neither a target name nor {{name, options}}")
    if name not in REGISTRY:
        raise CheckpointError(f"{where}: the metadata names attention target {name!r}, which is unknown (known: {', '.join(REGISTRY)})")
    try:
        get_target(name).layer_kinds(meta["hf_config"], opts)  # resolves and validates the options
    except ConfigError as e:
        raise CheckpointError(f"{where}: the metadata's {name} target options {opts} are inconsistent: {e}") from None
    return TargetConfig(name=name, options=opts)


def student_weights_hint(names) -> Optional[str]:
    """'mla' / 'gate_swa' when megatron weight names include a student's attention parameters."""
    for n in names:
        for marker, target in _STUDENT_MARKERS.items():
            if f".{marker}." in n or n.endswith(f".{marker}"):
                return target
    return None


def student_export(meta: dict, where: str) -> Optional[StudentExport]:
    """The HF format of the student in ``meta`` (None for a teacher)."""
    from megatron_attnedit.models.student import student_table

    target = target_from_metadata(meta, where)
    if target is None:
        return None
    cfg = meta["hf_config"]
    table = student_table(cfg, target, meta["tensor_model_parallel_size"])
    build = {"mla": _deepseek_v2, "gate_swa": _gateswa, "gqa": _teacher_format}[target.name]
    return build(cfg, target, table, where)


# --------------------------------------------------------------------------------------------
# MLA -> DeepSeek-V2
# --------------------------------------------------------------------------------------------


def _dense_prefix(cfg: dict, where: str) -> int:
    """first_k_dense_replace: the number of leading dense layers, when the rest are all MoE."""
    from megatron_attnedit import families

    moe = families.moe_layer_pattern(cfg)
    k = moe.index(1) if 1 in moe else len(moe)
    if any(moe[:k]) or not all(moe[k:]):
        dense = [i for i, m in enumerate(moe) if not m]
        raise CheckpointError(
            f"{where}: dense layers {dense} (mlp_only_layers / decoder_sparse_step) are not a prefix of the model; "
            "DeepSeek-V2's first_k_dense_replace can only make the first k layers dense, so this MoE student has no DeepSeek format"
        )
    return k


def _deepseek_v2(cfg: dict, target, table, where: str) -> StudentExport:
    from megatron_attnedit.attention.targets import get_target
    from megatron_attnedit import families

    t = get_target("mla")
    o = t.resolve(cfg, target.options)
    kinds = t.layer_kinds(cfg, target.options)
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
    theta = float(t.rotary_base(cfg, o))
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
        "q_lora_rank": o["q_lora_rank"],
        "kv_lora_rank": o["kv_lora_rank"],
        "qk_nope_head_dim": o["qk_head_dim"],
        "qk_rope_head_dim": o["qk_pos_emb_head_dim"],
        "v_head_dim": o["v_head_dim"],
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
    return StudentExport(target=target, table=table, hf_config=out, zero_tensors=zero, notes=notes)


def _check_stock_config(cfg: dict, where: str) -> None:
    """The config loads with the stock transformers class (fails here, before writing, if not)."""
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**cfg)
    except Exception as e:  # transformers' validation errors have no common base class
        raise CheckpointError(f"{where}: the exported {cfg['model_type']} config is rejected by transformers: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------
# GateSWA -> Qwen3 + auto_map
# --------------------------------------------------------------------------------------------


def _gateswa(cfg: dict, target, table, where: str) -> StudentExport:
    from megatron_attnedit.attention.targets import get_target

    t = get_target("gate_swa")
    o, kinds = t.resolve(cfg, target.options), t.layer_kinds(cfg, target.options)
    prefix = GATESWA_CLASSES.get(cfg["model_type"])
    if prefix is None:
        raise CheckpointError(f"{where}: the GateSWA code shipped with exports has no {cfg['model_type']} base (it has {', '.join(GATESWA_CLASSES)})")
    out = dict(cfg)
    out.update(
        model_type=cfg["model_type"] + "_gateswa",
        architectures=[f"{prefix}ForCausalLM"],
        auto_map={
            "AutoConfig": f"configuration_gateswa.{prefix}Config",
            "AutoModelForCausalLM": f"modeling_gateswa.{prefix}ForCausalLM",
        },
        use_sliding_window=True,
        sliding_window=int(o["window"]),
        layer_types=["sliding_attention" if k == "S" else "full_attention" for k in kinds],
        output_gate=o["gate"],
        attention_sinks=bool(o["sinks"]),
    )

    def fold_gate_factor(name: str, t: torch.Tensor) -> torch.Tensor:
        # 2 sigmoid(z) o W_o = sigmoid(z) o (2 W_o): exact (a power of two), so logits stay bit-comparable
        return t * 2 if name.endswith(".self_attn.o_proj.weight") else t

    return StudentExport(target=target, table=table, hf_config=out, code_files=tuple(os.path.join(GATESWA_CODE_DIR, f) for f in GATESWA_FILES),
                         transform=fold_gate_factor)


def _teacher_format(cfg: dict, target, table, where: str) -> StudentExport:
    return StudentExport(target=target, table=table, hf_config=dict(cfg))


def print_notes(export: Optional[StudentExport]) -> None:
    for line in export.notes if export else ():
        print(line, file=sys.stderr, flush=True)
