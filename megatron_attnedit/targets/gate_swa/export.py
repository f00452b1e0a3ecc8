"""GateSWA students exported as their teacher's family plus the gate, window, sinks and layer
pattern (``<teacher model_type>_gateswa``), loaded through ``auto_map`` from
``configuration_gateswa.py`` and ``modeling_gateswa.py`` (hf/) shipped next to the weights
(``from_pretrained(dir, trust_remote_code=True)``, offline). The gate is a plain sigmoid: the
training-time factor 2 is folded into o_proj, exactly.

The shipped code cannot import this project, so it carries one base per teacher family (Qwen3,
Qwen3-MoE, Llama): ``CLASSES`` names them.
"""

from __future__ import annotations

import os

import torch

from megatron_attnedit.errors import CheckpointError
from megatron_attnedit.targets.base import HFExport

CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
CODE_FILES = ("configuration_gateswa.py", "modeling_gateswa.py")
# teacher model_type -> the class name prefix of its GateSWA classes in hf/
CLASSES = {"qwen3": "GateSWA", "qwen3_moe": "GateSWAMoe", "llama": "GateSWALlama"}


def hf_export(t, cfg: dict, target, table, where: str) -> HFExport:
    """The student as its teacher's family plus the shipped GateSWA code (see the module docstring)."""
    o = t.resolve(cfg, target.options)
    kinds = o.kinds
    prefix = CLASSES.get(cfg["model_type"])
    if prefix is None:
        raise CheckpointError(f"{where}: the GateSWA code shipped with exports has no {cfg['model_type']} base (it has {', '.join(CLASSES)})")
    out = dict(cfg)
    out.update(
        model_type=cfg["model_type"] + "_gateswa",
        architectures=[f"{prefix}ForCausalLM"],
        auto_map={
            "AutoConfig": f"configuration_gateswa.{prefix}Config",
            "AutoModelForCausalLM": f"modeling_gateswa.{prefix}ForCausalLM",
        },
        use_sliding_window=True,
        sliding_window=int(o.window),
        layer_types=["sliding_attention" if k == "S" else "full_attention" for k in kinds],
        output_gate=o.gate,
        attention_sinks=bool(o.sinks),
    )

    def fold_gate_factor(name: str, t: torch.Tensor) -> torch.Tensor:
        # 2 sigmoid(z) o W_o = sigmoid(z) o (2 W_o): exact (a power of two), so logits stay bit-comparable
        return t * 2 if name.endswith(".self_attn.o_proj.weight") else t

    return HFExport(target=target, table=table, hf_config=out, code_files=tuple(os.path.join(CODE_DIR, f) for f in CODE_FILES),
                    transform=fold_gate_factor)

