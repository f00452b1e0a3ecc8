"""KV-cache bytes per token of each layer, from the shapes alone: the formula of every target.

The targets (``targets.get_target(name).kv_bytes_per_layer``) resolve their options and call these;
the decode benchmark calls them directly, because it runs where megatron-core (which the target
modules import) is not installed. The figures are per token of a context of ``context`` tokens:

  GQA layer      K and V of every KV head: 2 x kv_heads x head_dim x bytes, whatever the context;
  MLA layer      the latent and the shared RoPE key: (kv_lora_rank + qk_pos_emb_head_dim) x bytes;
  sliding layer  a GQA layer that keeps min(W, context) positions, spread over the context's tokens.

A cache that holds ``context`` positions therefore holds ``context`` x these bytes in each layer,
which is what the decode engine's allocated tensors are checked against (inference/kv.py).
"""

from __future__ import annotations

from typing import List, Sequence


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def gqa_layer(cfg: dict, bytes_per_elem: int = 2) -> int:
    """One GQA layer, one token: K and V of every KV head."""
    return 2 * int(cfg["num_key_value_heads"]) * head_dim(cfg) * bytes_per_elem


def gqa_layers(cfg: dict, bytes_per_elem: int = 2) -> List[float]:
    return [float(gqa_layer(cfg, bytes_per_elem))] * int(cfg["num_hidden_layers"])


def mla_layers(cfg: dict, kinds: Sequence[str], kv_lora_rank: int, qk_pos_emb_head_dim: int, bytes_per_elem: int = 2) -> List[float]:
    """``kinds``: one letter per layer, M (latent) or G (the teacher's GQA)."""
    latent = float((kv_lora_rank + qk_pos_emb_head_dim) * bytes_per_elem)
    return [latent if k == "M" else float(gqa_layer(cfg, bytes_per_elem)) for k in kinds]


def gate_swa_layers(cfg: dict, kinds: Sequence[str], window: int, context: int, bytes_per_elem: int = 2) -> List[float]:
    """``kinds``: one letter per layer, S (sliding window of ``window`` keys) or F (full)."""
    if context < 1:
        raise ValueError(f"context must be at least one token, got {context}")
    per_layer = float(gqa_layer(cfg, bytes_per_elem))
    share = min(window, context) / context
    return [per_layer * share if k == "S" else per_layer for k in kinds]
