"""Tiny Qwen3 checkpoints with random weights, written by ``transformers`` itself (the external truth).

Used by the tests and by the quickstart before a trained teacher exists; nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_attnedit import families


def make_tiny_hf(
    out_dir: str,
    preset: str = "qwen3-debug",
    seed: int = 0,
    max_shard_size: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> dict:
    """Write a random-weight HF checkpoint of ``preset`` (a name from families.PRESETS)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = families.config_for_preset(preset)
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # transformers initialises norms to 1; perturb them so that norm mapping mistakes show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(out_dir, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kw)
    return model.config.to_dict()


def hf_logits(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()
