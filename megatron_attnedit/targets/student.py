"""The student: the teacher with its attention replaced by a target, layer by layer.

``build_student`` builds this rank's model with the same layout as the teacher (same TP/PP split,
same embedding/MLP/norm parameters and names); only each layer's ``self_attention`` differs.
``init_student_from_teacher`` copies every non-attention parameter (unless the caller shares them)
and lets the target initialise each layer's attention from the teacher's layer on the same rank.
``student_table`` is the conversion table of the student, so student checkpoints convert through
the same declarative machinery as the teacher's.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_attnedit.config import TargetConfig
from megatron_attnedit.models.forward import forward_logits
from megatron_attnedit.models.layers import global_layer_index, local_layers
from megatron_attnedit.targets import get_target
from megatron_attnedit.families.table import ModelTable
from megatron_attnedit.models import builder


def student_config(hf_cfg: dict, target: TargetConfig, opts: builder.BuildOptions):
    """The student's TransformerConfig (validates the target against the teacher and the layout)."""
    t = get_target(target.name)
    t.validate(hf_cfg, target.options)
    t.validate_layout(hf_cfg, target.options, opts)
    config_class, overrides = t.config_overrides(hf_cfg, target.options)
    return builder.transformer_config(hf_cfg, opts, config_class=config_class, **overrides)


def build_student(hf_cfg: dict, target: TargetConfig, opts: builder.BuildOptions, borrow_mlp_from=None, meta_vocab=None):
    """This rank's student model (its pipeline stage, its TP shard), same layout as the teacher.

    ``borrow_mlp_from``: a teacher built from the same config and layout whose MLP/MoE modules the
    student's layers take as their own -- the student's MLPs are then never allocated, which is
    what keeps a frozen-MLP student (stage 1, stage 2 with attention-only training) from holding
    the largest part of the model twice while it is built. ``meta_vocab``: as in ``builder.build_model``."""
    t = get_target(target.name)
    config = student_config(hf_cfg, target, opts)
    borrow = None
    if borrow_mlp_from is not None:
        borrow = {global_layer_index(layer): layer.mlp for layer in local_layers(_unwrap(borrow_mlp_from))}
    return builder.build_model(
        hf_cfg,
        opts,
        config=config,
        attention_for_layer=lambda i: t.attention_spec(i, hf_cfg, target.options, opts),
        borrow_mlp=borrow,
        meta_vocab=meta_vocab,
    )


def student_table(hf_cfg: dict, target: TargetConfig, tp: int = 1) -> ModelTable:
    """HF <-> megatron table of the student (the target supplies its attention rules)."""
    t = get_target(target.name)
    t.validate(hf_cfg, target.options)
    return ModelTable(hf_cfg, attention_rules=lambda layer: t.attention_rules(layer, hf_cfg, target.options), tp=tp)


@torch.no_grad()
def capture_attention_inputs(teacher, tokens: torch.Tensor, max_tokens: int = 8192) -> Dict[int, torch.Tensor]:
    """{global layer: the teacher's normalised attention input [n, hidden]} on ``tokens`` for this
    rank's layers, at most ``max_tokens`` rows each. Calibration for initialisers that want input
    statistics (mla svd). Under sequence parallelism each rank holds a shard of the sequence; it is
    gathered, so every TP rank initialises its shard of the student from the same statistics."""
    out: Dict[int, torch.Tensor] = {}
    handles = []
    sp = _unwrap(teacher).config.sequence_parallel
    for layer in local_layers(teacher):
        idx = global_layer_index(layer)

        def hook(mod, args, kwargs, idx=idx):
            x = args[0] if args else kwargs["hidden_states"]
            if sp:
                x = gather_from_sequence_parallel_region(x.detach(), tensor_parallel_output_grad=False)
            out[idx] = x.detach().reshape(-1, x.shape[-1])[:max_tokens].float().cpu()

        handles.append(layer.self_attention.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        forward_logits(teacher, tokens)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def init_student_from_teacher(
    student,
    teacher,
    hf_cfg: dict,
    target: TargetConfig,
    copy_shared: bool = True,
    calibration: Optional[Dict[int, torch.Tensor]] = None,
) -> None:
    """Copy the teacher's non-attention parameters into the student (skip with ``copy_shared=False``
    when the caller shares them instead) and initialise every local layer's attention through the
    target. ``calibration``: optional ``capture_attention_inputs(teacher, tokens)``."""
    t = get_target(target.name)
    s_mod = _unwrap(student)
    t_mod = _unwrap(teacher)
    if copy_shared:
        t_params = dict(t_mod.named_parameters())
        for name, p in s_mod.named_parameters():
            src = t_params.get(name)
            if ".self_attention." in name or p is src:  # a borrowed module is the teacher's already
                continue
            if src is None or src.shape != p.shape:
                raise RuntimeError(f"student parameter {name} has no teacher counterpart of shape {tuple(p.shape)}; are both built with the same layout?")
            p.copy_(src)
    for s_layer, t_layer in zip(local_layers(s_mod), local_layers(t_mod)):
        idx = global_layer_index(s_layer)
        if idx != global_layer_index(t_layer):
            raise RuntimeError("student and teacher hold different layers on this rank; build both with the same layout")
        t.init_from_teacher(
            s_layer.self_attention,
            t_layer.self_attention,
            idx,
            hf_cfg,
            target.options,
            input_norm_weight=getattr(t_layer.input_layernorm, "weight", None),
            calibration=None if calibration is None else calibration.get(idx),
        )


def trainable_attention_params(student, target: TargetConfig):
    """What stage 1 trains on this rank: {global layer: [parameters]}."""
    t = get_target(target.name)
    return {global_layer_index(layer): t.trainable_attention_params(layer) for layer in local_layers(student)}


def _unwrap(model):
    m = model[0] if isinstance(model, (list, tuple)) else model
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    return m
