"""KV-cache bytes per token: the attention targets' formula, and the decode engine's allocated cache.

Which attention a Hugging Face checkpoint has: ``inference.attention_of`` (the ``attnedit`` record
of an export, else what the targets recognise in the config). The formula is the target's
``kv_bytes_per_layer`` on the teacher's config (head counts and dimensions the targets resolve
against) with the student's layer count, at the cache element size of the evaluation dtype.

Measured: the bytes of the tensors the decode engine (megatron_attnedit/inference) allocated for
the evaluation's greedy decode -- exactly its prompt + decoded positions; a sliding layer min(W,
positions) slots -- per layer, divided by those positions. It must equal the formula in every
layer (``measured_equals_config``); evaluate stops with exit code 1 when it does not.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from megatron_attnedit.eval import CONTEXTS
from megatron_attnedit.errors import ConfigError, EvalError
from megatron_attnedit.inference import attention_of as _attention_of
from megatron_attnedit.inference import kv
from megatron_attnedit.targets import TARGETS


def attention_of(cfg: dict):
    """(target name, target options) of an HF config (``inference.attention_of``)."""
    return _attention_of(cfg)


def describe(name: str, options: dict, teacher_cfg: dict = None) -> str:
    return TARGETS[name].describe(teacher_cfg, options)


def config_bytes_per_token(cfg: dict, teacher_cfg: dict, context: int, bytes_per_elem: int) -> float:
    """Whole-model KV bytes per token at ``context`` from the target's formula."""
    name, options = attention_of(cfg)
    base = dict(teacher_cfg, num_hidden_layers=int(cfg["num_hidden_layers"]))
    try:
        return float(TARGETS[name].kv_bytes_per_token(base, options, context, bytes_per_elem))
    except ConfigError as e:
        raise EvalError(f"the {name} attention recorded in the student's config does not fit the teacher's: {e}") from None


def per_context(cfg: dict, teacher_cfg: dict, bytes_per_elem: int, contexts=CONTEXTS) -> Dict[int, float]:
    """Whole-model KV bytes of one sequence of each context length."""
    return {c: config_bytes_per_token(cfg, teacher_cfg, c, bytes_per_elem) * c for c in contexts}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_summary(cfg: dict, teacher_cfg: dict, engine, positions: int, dtype: torch.dtype) -> dict:
    """Formula vs the engine's allocated cache at the decode's ``positions``, per layer and in all;
    and per-sequence bytes at CONTEXTS (formula)."""
    bpe = element_size(dtype)
    name, options = attention_of(cfg)
    formula = kv.formula_per_layer(cfg, positions, bpe, base_cfg=teacher_cfg)
    m = kv.measure(engine, positions)
    return dict(
        attention=name,
        description=describe(name, options, teacher_cfg),
        bytes_per_elem=bpe,
        positions=positions,
        config_bytes_per_token=float(sum(formula)),
        config_per_layer_bytes_per_token=formula,
        measured_bytes_per_token=m["bytes_per_token"],
        measured_per_layer_bytes_per_token=m["measured_per_layer"],
        measured_equals_config=len(formula) == len(m["measured_per_layer"])
        and all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(m["measured_per_layer"], formula)),
        per_context_bytes={str(c): b for c, b in per_context(cfg, teacher_cfg, bpe).items()},
    )
