"""The fixes to torch and megatron-core (megatron_attnedit/fixes.py): listed, applied once per
platform at start-up, and the only place that changes those libraries -- building a config or a
model patches nothing."""

from __future__ import annotations

import ast
import os
import pathlib

import torch

from megatron_attnedit import fixes, platform

LIB = pathlib.Path(os.environ.get("ATTNEDIT_TEST_LIB") or pathlib.Path(__file__).resolve().parent.parent / "megatron_attnedit")

EXPECTED = {
    "cuda_functions_on_cpu": ("cpu",),
    "megatron_cuda_rng_on_cpu": ("cpu",),
    "cuda_devices_on_cpu": ("cpu",),
    "mla_have_te": ("cpu", "cuda", "npu"),
    "moe_te_general_gemm": ("cpu", "cuda", "npu"),
    "checkpoint_without_output_fp8": ("cpu", "cuda", "npu"),
    "recompute_without_grad": ("cpu", "cuda", "npu"),
    "dgrad_skip": ("cpu", "cuda", "npu"),
    "wgrad_accumulation": ("cpu", "cuda"),
    "rope_fusion": ("cuda",),
}


def test_every_fix_is_listed_with_its_platforms_and_reason():
    assert {f.name: f.platforms for f in fixes.FIXES} == EXPECTED
    for f in fixes.FIXES:
        assert "0.16.1" in f.why or "apex" in f.why, f"{f.name} must say which megatron-core version or missing piece it answers"
        assert len(f.why) > 60, f.name


def test_the_cpu_platform_applies_the_cpu_fixes_and_no_others():
    platform.init_platform("cpu")
    applied = set(fixes.applied())
    want = {name for name, plats in EXPECTED.items() if "cpu" in plats}
    # tests may apply one more by name (test_fusions takes the RoPE fusion on the CPU)
    assert want <= applied <= want | {"rope_fusion"}


def _library_state():
    """Identity of every attribute of the torch / megatron-core objects the fixes touch."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils
    from torch.autograd.function import BackwardCFunction

    owners = [torch.cuda, torch.cuda.random, rope_utils, layers, mrandom, multi_latent_attention, moe_utils,
              layers.LinearWithGradAccumulationAndAsyncCommunication, mrandom.CheckpointWithoutOutput, BackwardCFunction]
    return {(i, k): id(v) for i, o in enumerate(owners) for k, v in vars(o).items()}, torch._dynamo.config.recompile_limit


def test_building_a_config_and_a_model_patches_nothing():
    from megatron_attnedit.models import builder
    from megatron_attnedit import families

    platform.init_distributed(platform.init_platform("cpu"))
    cfg = families.config_for_preset("qwen3-debug")
    before = _library_state()
    for fusion in (False, True):
        opts = builder.BuildOptions(kernel_fusion=fusion, gradient_accumulation_fusion=fusion)
        builder.build_model(cfg, opts, builder.transformer_config(cfg, opts))
    assert _library_state() == before


def _assigned_attribute_roots(tree: ast.AST):
    """Names whose attributes a module assigns (``x.y = ...``, ``setattr(x, ...)``)."""
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for e in ast.walk(t):
                if isinstance(e, ast.Attribute):
                    root = e
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name):
                        yield root.id, node.lineno
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and isinstance(node.args[0], ast.Name):
            yield node.args[0].id, node.lineno


def test_no_other_library_module_assigns_into_torch_or_megatron():
    """A module-level name bound to torch or megatron-core (by ``import`` / ``from ... import``) is
    never the root of an attribute assignment outside fixes.py."""
    found = []
    for path in sorted(LIB.rglob("*.py")):
        if path.name == "fixes.py":
            continue
        tree = ast.parse(path.read_text())
        foreign = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                foreign |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in ("torch", "megatron")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("torch", "megatron"):
                foreign |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):  # local aliases: cuda = torch.cuda, cls = mrandom.CheckpointWithoutOutput
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in foreign:
                    foreign |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for name, line in _assigned_attribute_roots(tree):
            if name in foreign:
                found.append(f"{os.path.relpath(path, LIB)}:{line} assigns an attribute of {name}")
    assert not found, "\n".join(found)
