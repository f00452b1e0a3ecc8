"""Teachers and students as megatron-core 0.19's HybridModel (models/hybrid.py): the model class
follows the installed megatron-core, the layer pattern says what each layer is, and the checkpoint
keys are GPTModel's, so checkpoints written with GPTModel (before HybridModel was used) load, and
those written now load into GPTModel. Run on each supported stack (0.16.1: GPTModel, 0.19.x)."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_attnedit import compat, families, platform
from megatron_attnedit.config import TargetConfig
from megatron_attnedit.models import builder
from megatron_attnedit.models.layers import decoder_layer_of_symbols, gpt_layout_name, local_layers
from megatron_attnedit.targets.student import build_student

on_019 = pytest.mark.skipif(not compat.HYBRID_MODEL, reason="HybridModel is built from megatron-core 0.19 on")

GATE_SWA = TargetConfig("gate_swa", {"window": 8, "pattern": "SF", "sinks": True})
MLA = TargetConfig("mla", {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8})
MIXED_MLA = TargetConfig("mla", {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8, "pattern": "MG"})

# (preset, student target or None for the teacher, the pattern on one pipeline stage)
MODELS = [
    ("qwen3-debug", None, "*-*-*-*-"),
    ("qwen3-moe-debug", None, "*-*E*E*E"),
    ("qwen3-debug", MLA, "+-+-+-+-"),
    ("qwen3-debug", MIXED_MLA, "+-+-+-+-"),  # megatron refuses "*" beside "+": the GQA layers sit in "+"
    ("qwen3-debug", GATE_SWA, "*-*-*-*-"),
    ("qwen3-moe-debug", GATE_SWA, "*-*E*E*E"),
]
IDS = ["dense", "moe", "mla", "mla-mixed", "gate_swa", "gate_swa-moe"]


@pytest.fixture(scope="module")
def env():
    platform.init_distributed(platform.init_platform("cpu"))
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def build(preset, target, meta=False, opts=None):
    cfg = families.config_for_preset(preset)
    opts = opts or builder.BuildOptions()
    vocab = 256 if meta else None
    torch.manual_seed(0)
    model = builder.build_model(cfg, opts, meta_vocab=vocab) if target is None else build_student(cfg, target, opts, meta_vocab=vocab)
    return cfg, model.eval()


def gpt_build(monkeypatch, *args, **kwargs):
    """The same model as GPTModel, as the project built it before HybridModel (0.19 still has it)."""
    with monkeypatch.context() as m:
        m.setattr(compat, "HYBRID_MODEL", False)
        return build(*args, **kwargs)


def test_layer_pattern_and_decoder_layers():
    from megatron_attnedit.models import hybrid  # noqa: F401  (skipped below where it cannot import)

    assert hybrid.layer_pattern(["*"] * 4, [False, True, False, True], 2) == "*-*E|*-*E"
    assert hybrid.layer_pattern(["+"] * 2, [False, False], 1) == "+-+-"
    assert decoder_layer_of_symbols("*-*E|*-*E") == [0, 0, 1, 1, 2, 2, 3, 3]


test_layer_pattern_and_decoder_layers = on_019(test_layer_pattern_and_decoder_layers)


@pytest.mark.parametrize("preset,target,pattern", MODELS, ids=IDS)
def test_model_class_follows_megatron_core(env, preset, target, pattern):
    """0.19: a HybridModel with one attention and one MLP symbol per decoder layer; before: GPTModel.
    Each decoder layer (models.layers.local_layers) pairs them, numbered as the decoder layer."""
    cfg, model = build(preset, target)
    layers = local_layers(model)
    assert len(layers) == cfg["num_hidden_layers"]
    assert [layer.layer_number for layer in layers] == list(range(1, cfg["num_hidden_layers"] + 1))
    moe = families.family_of(cfg).moe_layer_pattern(cfg)
    assert [hasattr(layer.mlp, "router") for layer in layers] == [bool(m) for m in moe]
    if not compat.HYBRID_MODEL:
        assert type(model).__name__ == "GPTModel"
        return
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    assert isinstance(model, HybridModel) and model.hybrid_layer_pattern == pattern
    assert "".join(model.decoder.layer_type_list) == pattern
    # both halves of decoder layer i carry layer_number i + 1 (per-layer config lists index by it)
    assert [m.layer_number for m in model.decoder.layers] == [i + 1 for i in decoder_layer_of_symbols(pattern)]
    if target is GATE_SWA:
        windows = [layer.self_attention.core_attention.window for layer in layers]
        assert windows == [8, None, 8, None]  # "SF" tiled: window on S layers, full attention on F
        assert all(type(layer.self_attention).__name__ == "GatedSelfAttention" for layer in layers)
    if target is MIXED_MLA:
        assert [type(layer.self_attention).__name__ for layer in layers][:2] == ["LocalMLASelfAttention", "RotarySelfAttention"]


@on_019
def test_building_logs_no_deprecation(env, caplog):
    """GPTModel logs 'GPTModel IS DEPRECATED' on 0.19 for every model built; HybridModel does not."""
    with caplog.at_level(logging.WARNING):
        build("qwen3-moe-debug", GATE_SWA)
        build("qwen3-debug", MLA)
    assert not [r for r in caplog.records if "DEPRECATED" in r.getMessage()], [r.getMessage() for r in caplog.records]


def _checkpoint_entries(model):
    """{checkpoint key: (global shape, offsets)} of the model's torch_dist checkpoint."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    out = {}
    for v in sharded.values():
        for sh in v if isinstance(v, list) else [v]:
            if isinstance(sh, ShardedTensor):
                out[(sh.key, tuple(sh.global_offset))] = tuple(sh.global_shape)
            elif isinstance(sh, ShardedObject):
                out[(sh.unique_key, ())] = "object"
    return out


@on_019
@pytest.mark.parametrize("preset,target,pattern", MODELS, ids=IDS)
def test_checkpoint_keys_are_gptmodels(env, monkeypatch, preset, target, pattern):
    """The torch_dist entries (keys, shapes, chunk offsets) and the parameter names in GPTModel's
    layout are the same for HybridModel as for GPTModel: the conversion tables and every
    checkpoint written before HybridModel keep working."""
    _, hybrid = build(preset, target, meta=True)
    _, gpt = gpt_build(monkeypatch, preset, target, meta=True)
    assert type(gpt).__name__ == "GPTModel" and type(hybrid).__name__ == "LocalHybridModel"
    assert _checkpoint_entries(hybrid) == _checkpoint_entries(gpt)
    names = gpt_layout_name(hybrid)
    shape = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)  # noqa: E731  (_extra_state: None)
    assert {names(k): shape(v) for k, v in hybrid.state_dict().items()} == {k: shape(v) for k, v in gpt.state_dict().items()}


@on_019
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_checkpoint_written_by_gptmodel_loads(env, monkeypatch, tmp_path, fmt):
    """A GateSWA-on-MoE student saved from GPTModel (torch_dist: megatron's dist_checkpointing; torch:
    the legacy per-rank state dict, in GPTModel's module names) loads into the HybridModel bit for
    bit, and gives the same logits; and back."""
    from megatron_attnedit.convert.checkpoint import load_mcore_checkpoint_into_model, save_mcore_checkpoint
    from megatron_attnedit.models.forward import forward_logits

    cfg, gpt = gpt_build(monkeypatch, "qwen3-moe-debug", GATE_SWA)
    with torch.no_grad():
        for i, p in enumerate(gpt.parameters()):
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))  # not the hybrid's init
    meta = {"hf_config": cfg, "padded_vocab_size": gpt.vocab_size,
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1}
    if fmt == "torch_dist":
        save_mcore_checkpoint(gpt, str(tmp_path), dict(meta))
    else:
        _save_legacy(gpt, tmp_path, meta)
    _, hybrid = build("qwen3-moe-debug", GATE_SWA)
    load_mcore_checkpoint_into_model(hybrid, str(tmp_path))
    names = gpt_layout_name(hybrid)
    want = gpt.state_dict()
    for k, v in hybrid.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, want[names(k)]), k
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(forward_logits(hybrid, tokens), forward_logits(gpt, tokens))
    if fmt == "torch_dist":  # and a checkpoint of the HybridModel loads into GPTModel
        back = tmp_path / "back"
        save_mcore_checkpoint(hybrid, str(back), dict(meta))
        _, gpt2 = gpt_build(monkeypatch, "qwen3-moe-debug", GATE_SWA)
        load_mcore_checkpoint_into_model(gpt2, str(back))
        assert all(torch.equal(v, want[k]) for k, v in gpt2.state_dict().items() if isinstance(v, torch.Tensor))


def _save_legacy(model, d, meta):
    """A legacy (``--ckpt-format torch``) checkpoint of a single-rank model, as the converter writes it."""
    import os

    from megatron_attnedit.convert.checkpoint import ATTNEDIT_KEY, TRACKER, iter_dir_name, legacy_rank_dir

    rank_dir = os.path.join(d, iter_dir_name(0), legacy_rank_dir(0, 0, 0, 1, 1))
    os.makedirs(rank_dir)
    torch.save({"model": model.state_dict(), "checkpoint_version": 3.0, "iteration": 0,
                ATTNEDIT_KEY: dict(meta, ckpt_format="torch")}, os.path.join(rank_dir, "model_optim_rng.pt"))
    with open(os.path.join(d, TRACKER), "w") as f:
        f.write("0")
