"""Hugging Face formats of students: what ``mcore_to_hf`` writes for a checkpoint whose metadata
names an attention target. Each target owns its format (``targets/<name>/export.py``: MLA ->
DeepSeek-V2, GateSWA -> the teacher's family + shipped code, gqa -> the teacher's format); this
module reads the target from the metadata, dispatches, and adds the ``attnedit`` record to the
exported config.json -- ``{"target": {"name", "options"}}`` -- from which the decode engine and the
evaluation recognise the export exactly (``inference.attention_of``).

The student's checkpoint metadata (written by ``training/checkpoint.py``): ``target`` = the target's
name (or ``{"name", "options"}``), ``target_options`` = its options. Both are checked here, before
anything is read or written; that they match the tensors is checked by the caller, which builds
the student's layout from them and compares every shape.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

from megatron_attnedit.config import TargetConfig
from megatron_attnedit.errors import CheckpointError, ConfigError
from megatron_attnedit.targets.student import student_table
from megatron_attnedit.targets import TARGETS, get_target
from megatron_attnedit.targets.base import HFExport


def target_from_metadata(meta: dict, where: str):
    """The checkpoint's TargetConfig (options validated against the stored config), or None for a teacher."""
    t, options = meta.get("target"), meta.get("target_options")
    if not t:
        if options:
            raise CheckpointError(f"{where}: the metadata has target_options but no target name; it is inconsistent")
        return None
    if options is not None and not isinstance(options, dict):
        raise CheckpointError(f"{where}: the metadata's target_options {options!r} are not a mapping")
    if isinstance(t, dict):
        name, opts = t.get("name"), dict(t.get("options") or {})
        opts.update(options or {})
    elif isinstance(t, str):
        name, opts = t, dict(options or {})
    else:
        raise CheckpointError(f"{where}: the metadata's target {t!r} is neither a target name nor {{name, options}}")
    if name not in TARGETS:
        raise CheckpointError(f"{where}: the metadata names attention target {name!r}, which is unknown (known: {', '.join(TARGETS)})")
    try:
        get_target(name).layer_kinds(meta["hf_config"], opts)  # resolves and validates the options
    except ConfigError as e:
        raise CheckpointError(f"{where}: the metadata's {name} target options {opts} are inconsistent: {e}") from None
    return TargetConfig(name=name, options=opts)


def student_weights_hint(names) -> Optional[str]:
    """The target whose students' attention parameters the megatron weight names include, if any."""
    for n in names:
        for t in TARGETS.values():
            if any(f".{marker}." in n or n.endswith(f".{marker}") for marker in t.weight_markers):
                return t.name
    return None


def student_export(meta: dict, where: str) -> Optional[HFExport]:
    """The HF format of the student in ``meta`` (None for a teacher)."""
    target = target_from_metadata(meta, where)
    if target is None:
        return None
    cfg = meta["hf_config"]
    table = student_table(cfg, target, meta["tensor_model_parallel_size"])
    t = get_target(target.name)
    export = t.hf_export(cfg, target, table, where)
    # the record that says exactly which target and options this export is (inference.attention_of)
    record = {"target": {"name": target.name, "options": t.options_record(cfg, target.options)}}
    return dataclasses.replace(export, hf_config=dict(export.hf_config, attnedit=record))


def print_notes(export: Optional[HFExport]) -> None:
    for line in export.notes if export else ():
        print(line, file=sys.stderr, flush=True)
