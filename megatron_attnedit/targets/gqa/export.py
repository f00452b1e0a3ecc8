"""The gqa target's students export in their teacher's own format (config unchanged)."""

from __future__ import annotations

from megatron_attnedit.targets.base import HFExport


def hf_export(t, cfg: dict, target, table, where: str) -> HFExport:
    return HFExport(target=target, table=table, hf_config=dict(cfg))
