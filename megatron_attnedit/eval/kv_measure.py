"""KV-cache bytes per token: from the config (the attention targets' formula) and measured.

Which attention a Hugging Face checkpoint has, in this order:
1. an ``attnedit`` record in its config.json, ``{"target": {"name": ..., "options": {...}}}``
   (what the project's exports may write; read as is);
2. ``model_type`` deepseek_v2 / deepseek_v3 -> ``mla`` with kv_lora_rank, qk_rope_head_dim,
   qk_nope_head_dim, v_head_dim, q_lora_rank from the config;
3. a ``layer_types`` list with ``sliding_attention`` entries (or model_type ``*_gateswa``, the
   project's GateSWA export) and a ``sliding_window`` -> ``gate_swa`` with that window and
   pattern (S for sliding, F for full layers);
4. qwen3 / qwen3_moe -> ``gqa`` (the teacher's attention).
The formula is the target's ``kv_bytes_per_token`` on the teacher's config (head counts and
dimensions the targets resolve against), at the cache element size of the evaluation dtype.

Measured: the bytes of every tensor the cache holds after a greedy decode, per layer, divided by
the positions it has seen (prompt + steps). For a stock transformers cache that is each layer's
``keys`` and ``values``; for the absorbed MLA decode the latent and the RoPE key. A sliding layer
of transformers keeps W - 1 tokens between steps (the current token makes W), where the formula
counts min(W, context): the two agree while the decode is shorter than the window.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from megatron_attnedit.eval import CONTEXTS, EvalError
from megatron_attnedit.eval.mla_decode import MLA_MODEL_TYPES, LatentCache


def attention_of(cfg: dict) -> Tuple[str, dict]:
    """(target name, target options) of an HF config (see the module docstring)."""
    rec = cfg.get("attnedit")
    if isinstance(rec, dict) and isinstance(rec.get("target"), dict) and rec["target"].get("name"):
        return rec["target"]["name"], dict(rec["target"].get("options") or {})
    mt = cfg.get("model_type")
    if mt in MLA_MODEL_TYPES:
        return "mla", dict(
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_pos_emb_head_dim=int(cfg["qk_rope_head_dim"]),
            qk_head_dim=int(cfg["qk_nope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            q_lora_rank=cfg.get("q_lora_rank"),
            init="random",  # not an initialization: keeps the option checks to the shapes
            inherit_o_proj=False,
        )
    types, window = cfg.get("layer_types"), cfg.get("sliding_window")
    gateswa = str(mt).endswith("_gateswa")  # the project's GateSWA export, even with no sliding layer
    if isinstance(types, list) and window and ("sliding_attention" in types or gateswa):
        return "gate_swa", dict(window=int(window), pattern=["S" if t == "sliding_attention" else "F" for t in types])
    if mt in ("qwen3", "qwen3_moe"):
        return "gqa", {}
    raise EvalError(f"cannot tell the attention of a {mt!r} checkpoint (expected qwen3, qwen3_moe, deepseek_v2/v3, or sliding layer_types)")


def describe(name: str, options: dict) -> str:
    if name == "mla":
        q = options.get("q_lora_rank")
        return f"MLA latent {options['kv_lora_rank']} + rope {options['qk_pos_emb_head_dim']}" + (f", q_lora {q}" if q else "")
    if name == "gate_swa":
        pattern = options.get("pattern")
        kinds = "".join(pattern) if isinstance(pattern, list) else str(pattern)
        return f"GateSWA W={options['window']} {kinds}"
    return "GQA (teacher attention)" if name == "gqa" else name


def config_bytes_per_token(cfg: dict, teacher_cfg: dict, context: int, bytes_per_elem: int) -> float:
    """Whole-model KV bytes per token at ``context`` from the target's formula."""
    from megatron_attnedit.attention.targets import get_target
    from megatron_attnedit.models.qwen3 import ConfigError

    name, options = attention_of(cfg)
    base = dict(teacher_cfg, num_hidden_layers=int(cfg["num_hidden_layers"]))
    try:
        return float(get_target(name).kv_bytes_per_token(base, options, context, bytes_per_elem))
    except ConfigError as e:
        raise EvalError(f"the {name} attention recorded in the student's config does not fit the teacher's: {e}") from None


def per_context(cfg: dict, teacher_cfg: dict, bytes_per_elem: int, contexts=CONTEXTS) -> Dict[int, float]:
    """Whole-model KV bytes of one sequence of each context length."""
    return {c: config_bytes_per_token(cfg, teacher_cfg, c, bytes_per_elem) * c for c in contexts}


def _layer_tensors(layer) -> List[torch.Tensor]:
    own = [getattr(layer, k, None) for k in ("keys", "values")]
    own = [t for t in own if isinstance(t, torch.Tensor)]
    if own:
        return own
    return [t for t in vars(layer).values() if isinstance(t, torch.Tensor) and t.dim() >= 3]


def cache_bytes_per_layer(cache) -> List[int]:
    """Bytes held per layer by a transformers Cache, a legacy tuple cache, or a LatentCache."""
    if isinstance(cache, LatentCache):
        return cache.bytes_per_layer()
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [sum(t.numel() * t.element_size() for t in _layer_tensors(layer)) for layer in layers]
    if isinstance(cache, (tuple, list)):
        return [sum(t.numel() * t.element_size() for t in layer if isinstance(t, torch.Tensor)) for layer in cache]
    raise EvalError(f"cannot measure a cache of type {type(cache).__name__}")


def measured(cache, positions: int) -> dict:
    """Per-layer and whole-model bytes per token of a cache that has seen ``positions`` tokens."""
    per_layer = cache_bytes_per_layer(cache)
    return dict(
        bytes_per_token=sum(per_layer) / positions,
        per_layer_bytes_per_token=[b / positions for b in per_layer],
        positions=positions,
    )


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_summary(cfg: dict, teacher_cfg: dict, cache, positions: int, dtype: torch.dtype, stock: Optional[dict] = None) -> dict:
    """Config formula vs measurement at the decode's context, and per-sequence bytes at CONTEXTS."""
    bpe = element_size(dtype)
    name, options = attention_of(cfg)
    out = dict(
        attention=name,
        description=describe(name, options),
        bytes_per_elem=bpe,
        config_bytes_per_token=config_bytes_per_token(cfg, teacher_cfg, positions, bpe),
        per_context_bytes={str(c): b for c, b in per_context(cfg, teacher_cfg, bpe).items()},
        **{f"measured_{k}" if k != "positions" else k: v for k, v in measured(cache, positions).items()},
    )
    if stock is not None:
        out["stock_cache"] = stock
    return out
