"""A decode engine for measurement (not a serving stack): static caches, batched prefill, greedy steps.

It runs a loaded transformers model -- the teacher (a supported family), an MLA student (DeepSeek-V2/V3
export) or a GateSWA student (the project's remote-code export) -- with its own attention and its own
preallocated cache, the way serving engines decode, and everything else (embeddings, norms, dense MLP
or MoE, lm_head) called as the model's own modules. Nothing here passes a cache to transformers, so
the engine does not depend on how a transformers release names its cache keyword; the model's own
forward over the whole sequence is the reference it is checked against (kv.verify_against_stock).

engine.py   DecodeEngine: the family-neutral runner (prefill, decode steps, CUDA graphs, greedy loop)
kv.py       cache bytes measured from the allocated tensors, against the targets' formula; the check
            of a decode against the stock forward

Each attention's cached decode lives in its target's home (``targets/<name>/decode.py``); the
shared pieces (attention over a static cache, RoPE tables) in ``attention/``. Neither imports
megatron-core: this package runs where it is not installed (launch/bench_decode.py on a GPU machine).
"""

from __future__ import annotations

from typing import Tuple

from megatron_attnedit.errors import EvalError
from megatron_attnedit.targets import RECOGNITION_ORDER, TARGETS


def get_kind(name: str):
    """The cached-attention class of the attention target ``name``."""
    if name not in TARGETS:
        raise EvalError(f"no cached decode for attention {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name].decode_class()


def attention_of(cfg: dict) -> Tuple[str, dict]:
    """(target name, target options) of a Hugging Face config: its ``attnedit`` record
    (``{"target": {"name", "options"}}``, written by every student export) when it has one, else the
    first target that recognises the config (exports written before the record existed, and stock
    models of an export's class: DeepSeek-V2/V3 -> mla, sliding ``layer_types`` -> gate_swa, a
    supported family -> gqa)."""
    rec = cfg.get("attnedit")
    if isinstance(rec, dict) and isinstance(rec.get("target"), dict) and rec["target"].get("name") in TARGETS:
        name = rec["target"]["name"]
        return name, TARGETS[name].recorded_options(dict(rec["target"].get("options") or {}))
    for name in RECOGNITION_ORDER:
        options = TARGETS[name].recognise(cfg)
        if options is not None:
            return name, options
    raise EvalError(
        f"cannot tell the attention of a {cfg.get('model_type')!r} checkpoint (no attnedit record; not a supported family, "
        "DeepSeek-V2/V3, or a model with sliding layer_types)"
    )
