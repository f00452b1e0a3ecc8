"""The ``gqa`` target: the teacher's own attention architecture, copied or re-initialised.

A plumbing target: distillation, conversion and the tests exercise the whole student path with
it, and ``init: copy`` gives a student that equals the teacher exactly (a stage-1 loss of zero).
Options: ``init`` = copy | random (random keeps the teacher's o_proj, as the paper's MLA init does).
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_attnedit.attention import kv_formula
from megatron_attnedit.attention.targets import AttentionTarget
from megatron_attnedit.families.table import gqa_attention_rules
from megatron_attnedit.models.builder import gqa_attention_spec
from megatron_attnedit.errors import ConfigError


class GQATarget(AttentionTarget):
    name = "gqa"
    DEFAULTS = {"init": "copy"}

    def resolve(self, hf_cfg, options):
        o = super().resolve(hf_cfg, options)
        if o["init"] not in ("copy", "random"):
            raise ConfigError(f"gqa init {o['init']!r} is unknown; use copy or random")
        return o

    def attention_spec(self, layer, hf_cfg, options, build_opts):
        return gqa_attention_spec(build_opts, hf_cfg)

    def config_overrides(self, hf_cfg, options):
        return TransformerConfig, {}

    def attention_rules(self, layer, hf_cfg, options):
        return gqa_attention_rules(hf_cfg)

    @torch.no_grad()
    def init_from_teacher(self, student_attn, teacher_attn, layer, hf_cfg, options, **extra):
        o = self.resolve(hf_cfg, options)
        if o["init"] == "copy":
            student_attn.load_state_dict(teacher_attn.state_dict())
        else:
            student_attn.linear_proj.weight.copy_(teacher_attn.linear_proj.weight)

    def kv_bytes_per_layer(self, hf_cfg, options, context, bytes_per_elem=2):
        return kv_formula.gqa_layers(hf_cfg, bytes_per_elem)

    def layer_kinds(self, hf_cfg, options) -> List[str]:
        return ["G"] * hf_cfg["num_hidden_layers"]
