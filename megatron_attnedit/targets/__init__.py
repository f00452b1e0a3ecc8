"""Attention targets: what replaces the teacher's attention. One folder per target, one registry line.

A target (``base.AttentionTarget``) owns its whole lifecycle in ``targets/<name>/``: typed options,
layer specs, initializer, what stage 1 trains, KV formula, FLOP count, run checks, HF export (and
shipped code), recognition of its own export, cached decode (base.py lists the files). The student
is the teacher's config plus a ``target:`` section (``config.TargetConfig``: name + options).

Adding a target: a folder ``targets/<name>/`` with ``__init__.py`` (the target class), ``model.py``,
``export.py``, ``decode.py``, plus one line in ``TARGETS`` below; ``tests/test_target_registry.py``
fails when a capability is missing. Order matters for recognition: a config is tried against each
target in turn (GateSWA's sliding layer_types before the family match of gqa).
"""

from __future__ import annotations

from typing import Dict

from megatron_attnedit.errors import ConfigError
from megatron_attnedit.targets.base import AttentionTarget
from megatron_attnedit.targets.gate_swa import GateSWATarget
from megatron_attnedit.targets.gqa import GQATarget
from megatron_attnedit.targets.mla import MLATarget

TARGETS: Dict[str, AttentionTarget] = {t.name: t for t in (MLATarget(), GateSWATarget(), GQATarget())}
RECOGNITION_ORDER = ("gate_swa", "mla", "gqa")


def get_target(name: str) -> AttentionTarget:
    """The registered target called ``name`` (one line naming the known ones if there is none)."""
    if name not in TARGETS:
        raise ConfigError(f"unknown attention target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]
