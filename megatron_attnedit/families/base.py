"""What a model family is: one ``Family`` per Hugging Face ``model_type``.

A family says everything the rest of the project needs to know about a teacher architecture:

* which HF configs it accepts (``check``) and its presets (public shapes and a debug preset);
* how its config reads: head dimension, RoPE base and scaling, routed experts per layer;
* its attention quirks -- what an attention target must handle: a per-head q/k RMSNorm before
  RoPE (``qk_norm``), q/k/v biases (``attention_bias`` in the config), RoPE scaling
  (``rope_types``);
* its HF <-> megatron mapping rules (``attention_rules``, ``mlp_rules``; the table machinery is
  ``mapping.py``, the per-model table ``table.py``).

The model builder (``models/builder.py``) reads these and nothing else, so it is family-neutral.
Everything here is plain Python plus torch (no megatron-core): the decode benchmark imports the
presets where megatron-core is not installed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch

from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families.mapping import Rule

REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")

# The HF layout every family here shares (LlamaForCausalLM's names), in megatron's local-spec names.
P = "decoder.layers.{L}."
H = "model.layers.{L}."

TOP = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0),
]
INPUT_NORM = Rule(P + "input_layernorm.weight", (H + "input_layernorm.weight",))
QKV = Rule(
    P + "self_attention.linear_qkv.weight",
    (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
    "qkv",
    0,
)
QKV_BIAS = Rule(
    P + "self_attention.linear_qkv.bias",
    (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
    "qkv",
    0,
)
QK_NORM = [
    Rule(P + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",)),
    Rule(P + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",)),
]
O_PROJ = Rule(P + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), "copy", 1)
DENSE_MLP = [
    Rule(P + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Rule(P + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), "gate_up", "gate_up"),
    Rule(P + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), "copy", 1),
]
MOE_MLP = [
    Rule(P + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",)),
    Rule(P + "mlp.router.weight", (H + "mlp.gate.weight",)),
    Rule(
        P + "mlp.experts.local_experts.{E}.linear_fc1.weight",
        (H + "mlp.experts.{E}.gate_proj.weight", H + "mlp.experts.{E}.up_proj.weight"),
        "gate_up",
        "gate_up",
        expert=True,
    ),
    Rule(P + "mlp.experts.local_experts.{E}.linear_fc2.weight", (H + "mlp.experts.{E}.down_proj.weight",), "copy", 1, expert=True),
]


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_parameters(cfg: dict) -> dict:
    """The RoPE description, whichever way the config writes it (transformers 5: ``rope_parameters``
    holding ``rope_theta``; 4.x: ``rope_theta`` and ``rope_scaling``)."""
    out = dict(cfg.get("rope_parameters") or {})
    out.update(cfg.get("rope_scaling") or {})
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    if "rope_theta" in cfg:
        out["rope_theta"] = cfg["rope_theta"]
    out.setdefault("rope_theta", 10000.0)
    return out


def rope_theta(cfg: dict) -> float:
    return float(rope_parameters(cfg)["rope_theta"])


def rope_type(cfg: dict) -> str:
    return str(rope_parameters(cfg)["rope_type"])


def rope_inv_freq(cfg: dict, dim: Optional[int] = None, base: Optional[float] = None) -> torch.Tensor:
    """Inverse frequencies [dim / 2] as transformers computes them for this config (fp32): the
    default ``base^(-2i/dim)``, and for ``rope_type: llama3`` Llama 3.1's smooth scaling of the low
    frequencies (``_compute_llama3_parameters``)."""
    dim = dim or head_dim(cfg)
    base = rope_theta(cfg) if base is None else base
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p = rope_parameters(cfg)
    if p["rope_type"] != "llama3":
        return inv
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF ``model_type``; see the module docstring."""

    model_type: str
    architecture: str  # the transformers class a checkpoint of this family loads into
    qk_norm: bool  # per-head RMSNorm of queries and keys before RoPE
    moe: bool  # routed experts (``num_experts``, ``decoder_sparse_step``, ``mlp_only_layers``)
    rope_types: Tuple[str, ...] = ("default",)
    presets: Dict[str, dict] = dataclasses.field(default_factory=dict)
    refused: Tuple[Tuple[str, str], ...] = ()  # (config key, why) that must be false / absent

    # -- config ----------------------------------------------------------------------------------
    def check(self, cfg: dict) -> None:
        missing = [k for k in REQUIRED_INTS if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] < 1]
        if missing:
            got = ", ".join(f"{k}={cfg.get(k)!r}" for k in missing)
            raise ConfigError(f"the config needs positive integers for {got}; restore the model's config.json")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r}; {self.model_type} uses silu")
        rt = rope_type(cfg)
        if rt not in self.rope_types:
            raise ConfigError(
                f"rope scaling {rope_parameters(cfg)} (rope_type {rt!r}) is not supported for {self.model_type}; "
                f"supported: {', '.join(self.rope_types)}"
            )
        for key, why in self.refused:
            if cfg.get(key):
                raise ConfigError(f"{key}: {cfg[key]!r} is not supported for {self.model_type} ({why})")

    def num_experts(self, cfg: dict) -> int:
        """Routed experts per MoE layer (transformers 5 writes ``num_local_experts``, 4.x ``num_experts``)."""
        return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if self.moe else 0

    def moe_layer_pattern(self, cfg: dict) -> List[int]:
        """1 where layer i has routed experts, 0 where it is dense (HF Qwen3MoE's rule)."""
        n = cfg["num_hidden_layers"]
        if not self.num_experts(cfg):
            return [0] * n
        step = int(cfg.get("decoder_sparse_step", 1))
        only = set(cfg.get("mlp_only_layers") or [])
        return [int(i not in only and step > 0 and (i + 1) % step == 0) for i in range(n)]

    # -- mapping ---------------------------------------------------------------------------------
    def attention_rules(self, cfg: dict) -> List[Rule]:
        """The teacher attention's tensors of one layer (the input norm included)."""
        return [INPUT_NORM, QKV] + (QK_NORM if self.qk_norm else []) + [O_PROJ] + ([QKV_BIAS] if cfg.get("attention_bias") else [])

    def mlp_rules(self, cfg: dict, moe_layer: bool) -> List[Rule]:
        return MOE_MLP if moe_layer else DENSE_MLP
