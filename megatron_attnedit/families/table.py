"""One model's HF <-> megatron table (megatron local-spec names <-> HF names), from its family's rules."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from megatron_attnedit.families import family_of, head_dim
from megatron_attnedit.families.base import TOP
from megatron_attnedit.families.mapping import Rule, Shapes, Table


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """Pad to a multiple of 128 (and of 128 x TP only when 128 does not split over TP), so that
    for the usual power-of-two TP the padded size -- and so the checkpoint -- is layout-free."""
    padded = ((vocab + multiple - 1) // multiple) * multiple
    if padded % tp:
        m = multiple * tp
        padded = ((vocab + m - 1) // m) * m
    return padded


def shapes(cfg: dict, tp: int = 1) -> Shapes:
    return Shapes(
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=head_dim(cfg),
        vocab_size=cfg["vocab_size"],
        padded_vocab_size=padded_vocab_size(cfg["vocab_size"], tp),
    )


def gqa_attention_rules(cfg: dict) -> List[Rule]:
    """The teacher's own attention of one layer (its family's rules)."""
    return family_of(cfg).attention_rules(cfg)


class ModelTable:
    """Every tensor of one model: per-layer rules (attention may differ per layer) + top rules."""

    def __init__(self, cfg: dict, attention_rules: Optional[Callable[[int], Sequence[Rule]]] = None, tp: int = 1):
        family = family_of(cfg)
        self.cfg = cfg
        self.shapes = shapes(cfg, tp)
        attention_rules = attention_rules or (lambda i: family.attention_rules(cfg))
        pattern = family.moe_layer_pattern(cfg)
        self.layer_rules: Dict[int, List[Rule]] = {
            i: list(attention_rules(i)) + family.mlp_rules(cfg, bool(pattern[i])) for i in range(len(pattern))
        }
        self.num_experts = {i: family.num_experts(cfg) if pattern[i] else 0 for i in range(len(pattern))}
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
