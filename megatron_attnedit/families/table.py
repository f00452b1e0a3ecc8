"""The Qwen3 / Qwen3-MoE table (megatron local-spec names <-> HF names)."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from megatron_attnedit.convert.mapping import Rule, Shapes, Table
from megatron_attnedit.models import qwen3 as qwen3_model

TOP = [
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0),
]

P = "decoder.layers.{L}."
H = "model.layers.{L}."

GQA_ATTENTION = [
    Rule(P + "input_layernorm.weight", (H + "input_layernorm.weight",)),
    Rule(
        P + "self_attention.linear_qkv.weight",
        (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
        "qkv",
        0,
    ),
    Rule(P + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",)),
    Rule(P + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",)),
    Rule(P + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), "copy", 1),
]
GQA_ATTENTION_BIAS = [
    Rule(
        P + "self_attention.linear_qkv.bias",
        (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
        "qkv",
        0,
    ),
]

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


def shapes(cfg: dict, tp: int = 1) -> Shapes:
    return Shapes(
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=qwen3_model.head_dim(cfg),
        vocab_size=cfg["vocab_size"],
        padded_vocab_size=qwen3_model.padded_vocab_size(cfg["vocab_size"], tp),
    )


def gqa_attention_rules(cfg: dict) -> List[Rule]:
    return GQA_ATTENTION + (GQA_ATTENTION_BIAS if cfg.get("attention_bias") else [])


class ModelTable:
    """Every tensor of one model: per-layer rules (attention may differ per layer) + top rules."""

    def __init__(self, cfg: dict, attention_rules: Optional[Callable[[int], Sequence[Rule]]] = None, tp: int = 1):
        self.cfg = cfg
        self.shapes = shapes(cfg, tp)
        attention_rules = attention_rules or (lambda i: gqa_attention_rules(cfg))
        pattern = qwen3_model.moe_layer_pattern(cfg)
        self.layer_rules: Dict[int, List[Rule]] = {
            i: list(attention_rules(i)) + (MOE_MLP if pattern[i] else DENSE_MLP) for i in range(len(pattern))
        }
        self.num_experts = {i: qwen3_model.num_experts(cfg) if pattern[i] else 0 for i in range(len(pattern))}
        top = [r for r in TOP if not (cfg.get("tie_word_embeddings") and r.megatron == "output_layer.weight")]
        self.top_rules = top
        all_rules = top + [r for rs in self.layer_rules.values() for r in rs]
        self.table = Table(list(dict.fromkeys(all_rules)))

    def entries(self):
        """(megatron name, hf names, rule) for every tensor, in checkpoint order."""
        return self.table.expand(self.layer_rules, self.top_rules, self.num_experts)

    def hf_names(self) -> List[str]:
        return [h for _, hf, _ in self.entries() for h in hf]

    def megatron_names(self) -> List[str]:
        return [m for m, _, _ in self.entries()]

    def rule_for(self, megatron_name: str):
        return self.table.match(megatron_name)
