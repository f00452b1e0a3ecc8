"""Every registered attention target has every capability (targets/base.py CAPABILITIES), in its
own folder, and the pure part of each works on the debug teachers without megatron-core: typed
options resolved against the teacher, layer kinds, KV formula, FLOP count, description, and
recognition of its own export -- by the ``attnedit`` record exports write, and by the config
alone for exports written before the record existed."""

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from megatron_attnedit import families
from megatron_attnedit.targets import RECOGNITION_ORDER, TARGETS
from megatron_attnedit.targets.base import CAPABILITIES, AttentionTarget, HFExport, LayerFlops

OPTIONS = {"mla": {"kv_lora_rank": 32, "qk_pos_emb_head_dim": 8}, "gate_swa": {"window": 8, "pattern": "SSF"}, "gqa": {}}


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_has_every_capability_in_its_folder(name):
    t = TARGETS[name]
    home = os.path.dirname(importlib.import_module(type(t).__module__).__file__)
    assert os.path.relpath(home, os.path.join(ROOT, "megatron_attnedit", "targets")) == name
    for capability, part in CAPABILITIES:
        if part == "__init__":
            assert getattr(type(t), capability) is not getattr(AttentionTarget, capability) or capability in ("attention_window", "run_warnings", "recognise"), \
                f"{name} does not implement {capability}"
        else:
            module = importlib.import_module(f"{type(t).__module__}.{part}")
            attr = "ATTENTION" if capability == "decode_class" else capability
            assert callable(getattr(module, attr, None)), f"{name}/{part}.py lacks {attr}"
    assert dataclasses.is_dataclass(t.Options) and t.title and t.KINDS
    assert name in RECOGNITION_ORDER


@pytest.mark.parametrize("preset", ["qwen3-debug", "qwen3-moe-debug", "llama3-debug"])
@pytest.mark.parametrize("name", list(TARGETS))
def test_pure_capabilities_on_each_family(name, preset):
    t, cfg = TARGETS[name], families.config_for_preset(preset)
    o = t.resolve(cfg, OPTIONS[name])
    assert isinstance(o, t.Options) and dataclasses.replace(o) == o  # typed and frozen-comparable
    kinds = t.layer_kinds(cfg, OPTIONS[name])
    assert len(kinds) == cfg["num_hidden_layers"] and set(kinds) <= set(t.KINDS)
    kv = t.kv_bytes_per_layer(cfg, OPTIONS[name], 64)
    assert len(kv) == len(kinds) and all(b > 0 for b in kv)
    flops = t.flops(cfg, OPTIONS[name], 64)
    assert len(flops) == len(kinds) and all(isinstance(f, LayerFlops) and f.proj > 0 and f.score > 0 for f in flops)
    assert t.describe(cfg, OPTIONS[name])
    record = t.options_record(cfg, OPTIONS[name])
    assert set(record) == set(t.defaults()) and t.resolve(cfg, record) == o  # the record resolves to the same options


def test_recognition_by_record_and_by_config():
    from megatron_attnedit.inference import attention_of

    cfg = families.config_for_preset("qwen3-debug")
    for name in TARGETS:
        rec = dict(cfg, attnedit={"target": {"name": name, "options": TARGETS[name].options_record(cfg, OPTIONS[name])}})
        got, options = attention_of(rec)
        assert got == name
        base = dict(cfg)
        assert TARGETS[name].kv_bytes_per_layer(base, options, 64) == TARGETS[name].kv_bytes_per_layer(base, OPTIONS[name], 64)
    # without a record: exports of before it, by their config
    assert attention_of(cfg)[0] == "gqa" and attention_of(families.config_for_preset("llama3-debug"))[0] == "gqa"
    deepseek = dict(model_type="deepseek_v2", kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=None)
    assert attention_of(deepseek) == ("mla", TARGETS["mla"].recognise(deepseek))
    swa = dict(cfg, model_type="qwen3_gateswa", layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8)
    assert attention_of(swa) == ("gate_swa", {"window": 8, "pattern": ["S", "F", "S", "F"]})


def test_pure_parts_import_without_megatron_core(tmp_path):
    """The decode engine and the benchmarks import the targets where megatron-core is not
    installed: a process in which importing megatron fails still gets options, formulas, the
    registry and every decode class."""
    blocker = tmp_path / "megatron"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('megatron-core is not installed here')\n")
    code = ("from megatron_attnedit.targets import TARGETS\nfrom megatron_attnedit.inference import engine\n"
            "print(sorted(t.decode_class().__name__ for t in TARGETS.values()))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "['GQAAttention', 'GateSWAAttention', 'MLAAttention']"


def test_hf_export_is_a_record_of_what_mcore_to_hf_needs():
    assert {f.name for f in dataclasses.fields(HFExport)} == {"target", "table", "hf_config", "code_files", "zero_tensors", "transform", "notes"}
