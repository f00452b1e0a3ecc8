"""Model families, keyed by Hugging Face ``model_type``: one entry per family, one file per family.

A family (``base.Family``) holds its config checks, presets, attention quirks (q/k-norm, biases,
RoPE scaling) and mapping rules; ``table.ModelTable`` turns them into one model's HF <-> megatron
table. A new family: one file here (a ``Family`` and its presets) plus one line in ``FAMILIES``.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List

from megatron_attnedit.errors import ConfigError, read_json_object
from megatron_attnedit.families.base import Family, head_dim, rope_inv_freq, rope_parameters, rope_theta, rope_type  # noqa: F401
from megatron_attnedit.families.llama import LLAMA
from megatron_attnedit.families.qwen3 import QWEN3, QWEN3_MOE

FAMILIES: Dict[str, Family] = {f.model_type: f for f in (QWEN3, QWEN3_MOE, LLAMA)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
PRESETS: Dict[str, dict] = {name: cfg for f in FAMILIES.values() for name, cfg in f.presets.items()}


def family_of(cfg: dict) -> Family:
    """The family of an HF config (one line naming the supported ones if there is none)."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"unsupported model_type {mt!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[mt]


def check_hf_config(cfg: dict) -> None:
    family_of(cfg).check(cfg)


def load_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found; --hf-dir must be a Hugging Face model directory")
    cfg = read_json_object(path, error=ConfigError)
    check_hf_config(cfg)
    return cfg


def config_for_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def num_experts(cfg: dict) -> int:
    return family_of(cfg).num_experts(cfg)


def moe_layer_pattern(cfg: dict) -> List[int]:
    return family_of(cfg).moe_layer_pattern(cfg)
