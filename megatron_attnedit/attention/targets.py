"""Attention targets: what replaces the teacher's attention, one file per target, one registry line.

A target turns a ``TargetConfig`` (the ``target:`` section of a recipe) into everything the rest of
the project needs: the megatron layer spec of each layer's attention, the TransformerConfig fields
it needs, the checkpoint mapping rules of its parameters, the initializer from the teacher's layer,
the parameters stage 1 trains, and the KV-cache bytes it costs.

Stage-1 plumbing (``attention_forward``): the student's layer l ``self_attention`` and the
teacher's are called on the same normalized input (the output of the teacher's input_layernorm,
[s, b, h]) and return comparable [s, b, h] outputs (after linear_proj, bias added). RoPE:

* GQA layers of a plain GPTModel get the rotary embedding from the model, which computes it once
  per forward (``model.rotary_pos_emb(seq_len)``); ``rotary_pos_emb_for(model, seq_len)`` returns
  it, and ``attention_forward`` refuses a plain GQA layer without it (it would silently skip RoPE).
* MLA layers compute their own (decoupled RoPE, megatron's MLASelfAttention) and must get None.
* GQA layers of mixed MLA/GQA students compute their own too (``RotarySelfAttention`` in mla.py),
  because GPTModel computes no rotary embedding when the config says multi_latent_attention.
Passing the model's embedding to every layer is always safe: ``attention_forward`` drops it for
layers that make their own.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Dict, List, Optional, Sequence, Union

import torch

from megatron_attnedit.attention import kv_formula
from megatron_attnedit.errors import ConfigError

# name -> "module:Class". A new target: one file in this package plus one line here.
REGISTRY: Dict[str, str] = {
    "mla": "megatron_attnedit.attention.mla:MLATarget",
    "gate_swa": "megatron_attnedit.attention.gate_swa:GateSWATarget",
    "gqa": "megatron_attnedit.attention.gqa:GQATarget",
}


@dataclasses.dataclass
class TargetConfig:
    """The ``target:`` section of a recipe."""

    name: str  # a REGISTRY key: mla | gate_swa | gqa
    options: dict = dataclasses.field(default_factory=dict)  # target-specific; validated by the target

    def __post_init__(self):
        if self.name not in REGISTRY:
            raise ConfigError(f"unknown attention target {self.name!r}; known: {', '.join(REGISTRY)}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"target options must be a mapping, got {type(self.options).__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> "TargetConfig":
        """{'name': ..., 'options': {...}} or the flat form {'name': ..., 'window': ..., ...}."""
        d = dict(d)
        if "name" not in d:
            raise ConfigError("target section needs a 'name' (one of: " + ", ".join(REGISTRY) + ")")
        name = d.pop("name")
        options = dict(d.pop("options", {}) or {})
        options.update(d)
        return cls(name=name, options=options)

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}


_INSTANCES: Dict[str, "AttentionTarget"] = {}


def get_target(name: str) -> "AttentionTarget":
    """The registered target called ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown attention target {name!r}; known: {', '.join(REGISTRY)}")
    if name not in _INSTANCES:
        mod, cls = REGISTRY[name].split(":")
        _INSTANCES[name] = getattr(importlib.import_module(mod), cls)()
    return _INSTANCES[name]


class AttentionTarget:
    """Base class; see the module docstring. Subclasses set ``name``, ``DEFAULTS`` (every option
    with its default; options not listed there are rejected by name) and implement the rest."""

    name: str = ""
    DEFAULTS: Dict[str, object] = {}

    # -- options ---------------------------------------------------------------------------------
    def check_keys(self, options: dict) -> None:
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for target {self.name}; known: {', '.join(self.DEFAULTS)}"
            )

    def resolve(self, hf_cfg: dict, options: dict) -> dict:
        """Options with defaults filled in (and derived values resolved)."""
        self.check_keys(options)
        out = dict(self.DEFAULTS)
        out.update(options)
        return out

    def validate(self, hf_cfg: dict, options: dict) -> None:
        self.resolve(hf_cfg, options)

    def validate_layout(self, hf_cfg: dict, options: dict, build_opts) -> None:
        """Divisibility rules of the parallel layout that this target adds."""

    def calibration_tokens(self, hf_cfg: dict, options: dict) -> int:
        """Training tokens whose teacher activations ``init_from_teacher`` wants (0: none)."""
        return 0

    def layer_kinds(self, hf_cfg: dict, options: dict) -> List[str]:
        """One kind letter per layer (target-specific, e.g. S/F for GateSWA, M/G for MLA)."""
        return ["G"] * hf_cfg["num_hidden_layers"]

    # -- the interface -------------------------------------------------------------------------
    def attention_spec(self, layer: int, hf_cfg: dict, options: dict, build_opts):
        raise NotImplementedError

    def config_overrides(self, hf_cfg: dict, options: dict):
        raise NotImplementedError

    def attention_rules(self, layer: int, hf_cfg: dict, options: dict):
        raise NotImplementedError

    @torch.no_grad()
    def init_from_teacher(self, student_attn, teacher_attn, layer: int, hf_cfg: dict, options: dict, **extra) -> None:
        raise NotImplementedError

    def trainable_attention_params(self, layer_module) -> List[torch.nn.Parameter]:
        return list(layer_module.self_attention.parameters())

    def kv_bytes_per_layer(self, hf_cfg: dict, options: dict, context: int, bytes_per_elem: int = 2) -> List[float]:
        """KV-cache bytes per token of each layer at a context of ``context`` tokens (kv_formula.py)."""
        raise NotImplementedError

    def kv_bytes_per_token(self, hf_cfg: dict, options: dict, context: int, bytes_per_elem: int = 2) -> float:
        """The whole model's KV-cache bytes per token: the layers' sum."""
        return float(sum(self.kv_bytes_per_layer(hf_cfg, options, context, bytes_per_elem)))

    def describe(self, hf_cfg: dict, options: dict) -> str:
        """One line for logs and the KV report."""
        o = self.resolve(hf_cfg, options)
        return f"{self.name} " + " ".join(f"{k}={v}" for k, v in o.items())


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def gqa_kv_bytes_per_token_per_layer(hf_cfg: dict, bytes_per_elem: int = 2) -> int:
    """K and V of every KV head: 2 x kv_heads x head_dim x bytes."""
    return kv_formula.gqa_layer(hf_cfg, bytes_per_elem)


def teacher_kv_bytes_per_token(hf_cfg: dict, bytes_per_elem: int = 2) -> int:
    """Whole teacher model (all layers), independent of context length."""
    return int(hf_cfg["num_hidden_layers"]) * gqa_kv_bytes_per_token_per_layer(hf_cfg, bytes_per_elem)


def expand_pattern(pattern: Union[str, Sequence[str]], num_layers: int, kinds: Dict[str, str], option: str = "pattern") -> List[str]:
    """A per-layer list of kind letters from a string tiled over the layers ("SSSSSF") or an
    explicit list of one letter per layer. ``kinds`` maps each allowed letter to its meaning."""
    allowed = ", ".join(f"{k} ({v})" for k, v in kinds.items())
    if isinstance(pattern, str):
        letters = list(pattern.strip())
        if not letters:
            raise ConfigError(f"{option} is empty; use letters {allowed}")
        per_layer = [letters[i % len(letters)] for i in range(num_layers)]
    elif isinstance(pattern, (list, tuple)):
        per_layer = [str(x) for x in pattern]
        if len(per_layer) != num_layers:
            raise ConfigError(f"{option} lists {len(per_layer)} layers but the model has {num_layers}; give one entry per layer or a string to tile")
        letters = per_layer
    else:
        raise ConfigError(f"{option} must be a string like 'SSSSSF' or a list of one letter per layer, got {pattern!r}")
    bad = sorted({x for x in letters if x not in kinds})
    if bad:
        raise ConfigError(f"{option} {pattern!r} names unknown layer kind(s) {', '.join(map(repr, bad))}; use {allowed}")
    return per_layer


def check_int(options: dict, key: str, low: int = 1, high: Optional[int] = None, why: str = "") -> int:
    v = options.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key}={v} is out of range; it must be {rng}{why}")
    return v


# --------------------------------------------------------------------------------------------
# Stage-1 plumbing: one layer's attention on its own
# --------------------------------------------------------------------------------------------


def computes_own_rope(attn) -> bool:
    """True for attention modules that build their rotary embedding themselves (MLA, and the GQA
    layers of mixed MLA/GQA students)."""
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    return isinstance(attn, MultiLatentAttention) or getattr(attn, "computes_own_rope", False)


def rotary_pos_emb_for(model, seq_len: int) -> Optional[torch.Tensor]:
    """The rotary embedding GPTModel would pass its layers for ``seq_len`` tokens (full length,
    also under sequence parallelism), or None when the model computes none (MLA configs)."""
    m = model[0] if isinstance(model, (list, tuple)) else model
    m = getattr(m, "module", m)  # DDP / Float16Module wrappers
    while not hasattr(m, "rotary_pos_emb") and hasattr(m, "module"):
        m = m.module
    rope = getattr(m, "rotary_pos_emb", None)
    return None if rope is None else rope(seq_len)


def attention_forward(layer_module, normed_hidden: torch.Tensor, rotary_pos_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer_module.self_attention`` on ``normed_hidden`` [s, b, h] (the output of an
    input_layernorm; [s/tp, b, h] under sequence parallelism): the output after linear_proj with
    its bias added, [s, b, h]. ``rotary_pos_emb``: ``rotary_pos_emb_for(model, s)``; ignored by
    layers that compute their own RoPE, required by the others."""
    attn = layer_module.self_attention
    if computes_own_rope(attn):
        rotary_pos_emb = None
    elif rotary_pos_emb is None:
        raise ValueError(
            f"layer {layer_module.layer_number}: this attention applies RoPE from the model; pass rotary_pos_emb_for(model, seq_len)"
        )
    out, bias = attn(normed_hidden, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
    return out if bias is None else out + bias


def local_layers(model) -> List:
    """This rank's TransformerLayers (its pipeline stage) of a GPTModel (or a list of one)."""
    m = model[0] if isinstance(model, (list, tuple)) else model
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    return list(m.decoder.layers)


def global_layer_index(layer_module) -> int:
    """0-based index in the whole model (megatron's layer_number is global and 1-based)."""
    return int(layer_module.layer_number) - 1
