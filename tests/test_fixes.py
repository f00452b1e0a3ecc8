"""The fixes to torch and megatron-core (megatron_attnedit/fixes.py): listed with their platforms
and megatron-core version ranges, applied once per platform at start-up where the installed
megatron-core needs them, each still needed where it is applied and gone where it is not (a fresh
process probes the unpatched library), and the only place that changes those libraries --
building a config or a model patches nothing. Run on each supported stack (0.16.1, 0.19.x)."""

from __future__ import annotations

import ast
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from megatron_attnedit import compat, fixes, platform

LIB = pathlib.Path(os.environ.get("ATTNEDIT_TEST_LIB") or pathlib.Path(__file__).resolve().parent.parent / "megatron_attnedit")
ROOT = pathlib.Path(__file__).resolve().parent.parent

ANY, BEFORE_019 = (None, None), (None, "0.19.0")
EXPECTED = {  # name: (platforms, megatron-core versions that need it)
    "cuda_functions_on_cpu": (("cpu",), ANY),
    "megatron_cuda_rng_on_cpu": (("cpu",), ANY),
    "cuda_devices_on_cpu": (("cpu",), ANY),
    "mla_have_te": (("cpu", "cuda", "npu"), BEFORE_019),
    "moe_te_general_gemm": (("cpu", "cuda", "npu"), BEFORE_019),
    "checkpoint_without_output_fp8": (("cpu", "cuda", "npu"), ANY),
    "recompute_without_grad": (("cpu", "cuda", "npu"), ANY),
    "dgrad_skip": (("cpu", "cuda", "npu"), ANY),
    "wgrad_accumulation": (("cpu", "cuda"), ANY),
    "rope_fusion": (("cuda",), ANY),
}


def test_every_fix_is_listed_with_its_platforms_versions_and_reason():
    assert {f.name: (f.platforms, f.mcore) for f in fixes.FIXES} == EXPECTED
    for f in fixes.FIXES:
        assert "0.16.1" in f.why and ("0.19.2" in f.why or "apex" in f.why), f"{f.name} must say which megatron-core versions it was checked on"
        assert len(f.why) > 60, f.name


def test_version_ranges():
    assert compat.mcore_in(None, "0.19.0", (0, 16, 1)) and not compat.mcore_in(None, "0.19.0", (0, 19, 2))
    assert compat.mcore_in("0.17", None, (0, 19, 2)) and not compat.mcore_in("0.17", None, (0, 16, 1))
    assert compat._parse("0.19.2rc1+abc") == (0, 19, 2) and compat._parse("0.20") == (0, 20, 0)
    assert compat.MCORE >= (0, 16, 1)


PROBE = """
import json, sys
from megatron_attnedit import fixes
out = {}
for fix in fixes.FIXES:  # in order: each probed with the fixes before it applied
    before = fix.probe()
    if fix.needed():
        fixes.apply_one(fix.name)
    out[fix.name] = [before, fix.probe()]
print(json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probes look for CUDA assumptions on a machine without a GPU")
def test_each_fix_is_applied_exactly_where_megatron_core_has_its_bug():
    """In a fresh process (no fixes applied): every fix the installed megatron-core needs by its
    version range shows its bug before it is applied and none after; every fix outside its range
    shows none. A fix whose bug a new megatron-core fixed fails here: narrow its range."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    version = ".".join(map(str, compat.MCORE))
    wrong = []
    for f in fixes.FIXES:
        before, after = seen[f.name]
        if f.needed() and not before:
            wrong.append(f"{f.name}: applied on megatron-core {version}, but its bug is gone there; narrow its version range")
        elif not f.needed() and before:
            wrong.append(f"{f.name}: megatron-core {version} has its bug, but the fix's range {f.mcore} leaves it out")
        elif f.needed() and after:
            wrong.append(f"{f.name}: still shows its bug after being applied")
    assert not wrong, "\n".join(wrong)


def test_megatron_mla_still_refuses_deepseek_norms_on_the_local_spec():
    """compat.DeepSeekNorms: megatron-core >= 0.17 refuses DeepSeek's latent norms with full-rank
    queries on the local spec, which our MLA layer builds as 0.16.1 did. When megatron builds
    it, the mixin can go."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention
    from megatron.core.transformer.spec_utils import build_module

    from megatron_attnedit import families
    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.models import builder
    from megatron_attnedit.targets import get_target
    from megatron_attnedit.targets.student import student_config

    platform.init_distributed(platform.init_platform("cpu"))
    opts = builder.BuildOptions()
    for preset in ("qwen3-debug", "llama3-debug"):  # with and without the teacher's qk-norm
        cfg = families.config_for_preset(preset)
        target = TargetConfig("mla", {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8})
        config = student_config(cfg, target, opts)
        spec = get_target("mla").attention_spec(0, cfg, target.options, opts)
        ours = build_module(spec, config=config, layer_number=1)
        names = {n for n, _ in ours.named_parameters()}
        assert "kv_layernorm.weight" in names and not any(n.startswith("q_layernorm") for n in names)
        spec.module = MLASelfAttention
        if compat.mcore_in("0.17", None):
            with pytest.raises((ValueError, RuntimeError)):
                build_module(spec, config=config, layer_number=1)
        else:
            theirs = build_module(spec, config=config, layer_number=1)
            assert {n for n, _ in theirs.named_parameters()} == names


def test_the_cpu_platform_applies_the_cpu_fixes_and_no_others():
    platform.init_platform("cpu")
    applied = set(fixes.applied())
    want = {name for name, (plats, versions) in EXPECTED.items() if "cpu" in plats and compat.mcore_in(*versions)}
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
    gpt_log_filters = [id(f) for f in logging.getLogger("megatron.core.models.gpt.gpt_model").filters]
    return {(i, k): id(v) for i, o in enumerate(owners) for k, v in vars(o).items()}, torch._dynamo.config.recompile_limit, gpt_log_filters


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
