"""The gqa target on megatron-core: the teacher's attention spec and rules, copied or re-initialised."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_attnedit.families.table import gqa_attention_rules
from megatron_attnedit.models.builder import gqa_attention_spec


def config_overrides(target, hf_cfg, options):
    return TransformerConfig, {}


def attention_spec(target, layer, hf_cfg, options, build_opts):
    return gqa_attention_spec(build_opts, hf_cfg)


def attention_rules(target, layer, hf_cfg, options):
    return gqa_attention_rules(hf_cfg)


@torch.no_grad()
def init_from_teacher(target, student_attn, teacher_attn, layer, hf_cfg, options, **extra):
    if target.resolve(hf_cfg, options).init == "copy":
        student_attn.load_state_dict(teacher_attn.state_dict())
    else:
        student_attn.linear_proj.weight.copy_(teacher_attn.linear_proj.weight)


def trainable_attention_params(target, layer_module):
    return list(layer_module.self_attention.parameters())


def validate_layout(target, hf_cfg, options, build_opts):
    pass  # the teacher's own layout rules (models/builder.check_parallel)
