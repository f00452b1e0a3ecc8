"""The ``gqa`` target: the teacher's own attention architecture, copied or re-initialised.

A plumbing target: distillation, conversion and the tests exercise the whole student path with
it, and ``init: copy`` gives a student that equals the teacher exactly (a stage-1 loss of zero).
Options: ``init`` = copy | random (random keeps the teacher's o_proj, as the paper's MLA init does).
It is also how a teacher is recognised: any config of a supported family is "gqa".
"""

from __future__ import annotations

import dataclasses
from typing import List

from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families import FAMILIES
from megatron_attnedit.targets.base import AttentionTarget, LayerFlops, gqa_layer_bytes, gqa_layer_flops


@dataclasses.dataclass(frozen=True)
class GQAOptions:
    init: str = "copy"  # copy | random


class GQATarget(AttentionTarget):
    name = "gqa"
    title = "GQA"
    Options = GQAOptions
    KINDS = {"G": "the teacher's GQA attention"}

    def resolve(self, hf_cfg, options) -> GQAOptions:
        o = super().resolve(hf_cfg, options)
        if o.init not in ("copy", "random"):
            raise ConfigError(f"gqa init {o.init!r} is unknown; use copy or random")
        return o

    def layer_kinds(self, hf_cfg, options) -> List[str]:
        return ["G"] * hf_cfg["num_hidden_layers"]

    def kv_bytes_per_layer(self, hf_cfg, options, context, bytes_per_elem=2):
        return [float(gqa_layer_bytes(hf_cfg, bytes_per_elem))] * int(hf_cfg["num_hidden_layers"])

    def flops(self, hf_cfg, options, seq) -> List[LayerFlops]:
        return [gqa_layer_flops(hf_cfg, seq)] * int(hf_cfg["num_hidden_layers"])

    def describe(self, hf_cfg, options) -> str:
        return "GQA (teacher attention)"

    def recognise(self, cfg):
        return {} if cfg.get("model_type") in FAMILIES else None
