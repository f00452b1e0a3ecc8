"""A decode engine for measurement (not a serving stack): static caches, batched prefill, greedy steps.

It runs a loaded transformers model -- the teacher (Qwen3 / Qwen3-MoE), an MLA student (DeepSeek-V2/V3
export) or a GateSWA student (the project's remote-code export) -- with its own attention and its own
preallocated cache, the way serving engines decode, and everything else (embeddings, norms, dense MLP
or MoE, lm_head) called as the model's own modules. Nothing here passes a cache to transformers, so
the engine does not depend on how a transformers release names its cache keyword; the model's own
forward over the whole sequence is the reference it is checked against (kv.verify_against_stock).

engine.py   DecodeEngine: the family-neutral runner (prefill, decode steps, CUDA graphs, greedy loop)
rope.py     RoPE tables built from the model's own inverse frequencies; rotate-half and interleaved
attend.py   attention over a static cache (masked, optional sink logits) and the prefill kernels
gqa.py      kind "gqa": full K/V of every KV head (the teacher)
gate_swa.py kind "gate_swa": a ring buffer of W positions in sliding layers, full K/V in full layers,
            the output gate and the sinks
mla.py      kind "mla": the latent and the RoPE key per token; W_UK absorbed into the query, W_UV
            applied after the attention
kv.py       cache bytes measured from the allocated tensors, against the targets' formula; the check
            of a decode against the stock forward

An attention kind is one class per file, registered below by the attention target's name (the
names of attention/targets.py), so that each kind can move into its target's home unchanged.
"""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

from megatron_attnedit.errors import EvalError
from megatron_attnedit.families import FAMILIES

# target name -> "module:Class" of its cached attention. A new kind: one file plus one line here.
KINDS: Dict[str, str] = {
    "gqa": "megatron_attnedit.inference.gqa:GQAAttention",
    "gate_swa": "megatron_attnedit.inference.gate_swa:GateSWAAttention",
    "mla": "megatron_attnedit.inference.mla:MLAAttention",
}

MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")



def get_kind(name: str):
    """The cached-attention class registered for the attention target ``name``."""
    if name not in KINDS:
        raise EvalError(f"no cached decode for attention {name!r}; known: {', '.join(KINDS)}")
    mod, cls = KINDS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def attention_of(cfg: dict) -> Tuple[str, dict]:
    """(target name, target options) of a Hugging Face config, in this order:

    1. an ``attnedit`` record in config.json, ``{"target": {"name": ..., "options": {...}}}``;
    2. ``model_type`` deepseek_v2 / deepseek_v3 -> ``mla`` with the config's latent shapes;
    3. ``layer_types`` with ``sliding_attention`` entries (or model_type ``*_gateswa``, the project's
       GateSWA export) and a ``sliding_window`` -> ``gate_swa`` with that window and the S/F pattern;
    4. a teacher family's model_type (families.FAMILIES) -> ``gqa`` (the teacher's attention)."""
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
    if mt in FAMILIES:
        return "gqa", {}
    raise EvalError(
        f"cannot tell the attention of a {mt!r} checkpoint (expected {', '.join(FAMILIES)}, deepseek_v2/v3, or sliding layer_types)"
    )
