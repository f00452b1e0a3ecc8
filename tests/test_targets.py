"""Attention targets on one process: registry and config errors, GateSWA against the teacher and the
dense-mask reference, sinks, auto pattern against transformers' attention weights, KV accounting,
conversion-table coverage of the students. MLA lives in test_targets_mla.py."""

import json

import pytest
import torch

from megatron_attnedit import platform
from megatron_attnedit.attention import core
from megatron_attnedit.config import TargetConfig
from megatron_attnedit.models.layers import attention_forward, gpt_layout_name, local_layers, rotary_pos_emb_for
from megatron_attnedit.targets import TARGETS, get_target
from megatron_attnedit.models import builder
from megatron_attnedit import families
from megatron_attnedit.errors import ConfigError

TOL = 1e-5
SEQ = 24


@pytest.fixture(scope="module")
def env():
    plat = platform.init_platform("cpu")
    platform.init_distributed(plat)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def teacher_from_hf(hf_dir):
    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.families.table import ModelTable

    cfg = families.load_hf_config(hf_dir)
    model = builder.build_model(cfg, builder.BuildOptions())
    hf_io.load_into_model(model, hf_io.HFCheckpoint(hf_dir), ModelTable(cfg))
    return cfg, model.eval()


def student_for(cfg, teacher, name, options, **init_kw):
    from megatron_attnedit.targets.student import build_student, init_student_from_teacher

    tc = TargetConfig(name, options)
    model = build_student(cfg, tc, builder.BuildOptions())
    init_student_from_teacher(model, teacher, cfg, tc, **init_kw)
    return tc, model.eval()


def hidden(seed=0, s=SEQ, b=2, h=64):
    return torch.randn(s, b, h, generator=torch.Generator().manual_seed(seed))


def paired_outputs(teacher, student, x):
    """[(teacher layer output, student layer output)] on the teacher's normalised input of x."""
    out = []
    s = x.shape[0]
    for lt, ls in zip(local_layers(teacher), local_layers(student)):
        xn = lt.input_layernorm(x)
        out.append((attention_forward(lt, xn, rotary_pos_emb_for(teacher, s)), attention_forward(ls, xn, rotary_pos_emb_for(student, s))))
    return out


def capture_core_inputs(layer):
    """Register a hook keeping the (q, k, v) the core attention of ``layer`` receives."""
    box = {}

    def hook(mod, args, kwargs):
        box["qkv"] = tuple(a.detach() for a in args[:3])

    return box, layer.self_attention.core_attention.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def dense(env, tiny_hf):
    return teacher_from_hf(tiny_hf["dense"])


# --------------------------------------------------------------------------------------------
# Registry and errors
# --------------------------------------------------------------------------------------------


def test_registry_and_target_config():
    assert {"mla", "gate_swa", "gqa"} <= set(TARGETS)
    assert get_target("gate_swa").name == "gate_swa"
    with pytest.raises(ConfigError, match="unknown attention target 'swa'"):
        get_target("swa")
    with pytest.raises(ConfigError, match="target section needs a 'name'"):
        TargetConfig.from_dict({"window": 8})
    flat = TargetConfig.from_dict({"name": "gate_swa", "window": 8})
    nested = TargetConfig.from_dict({"name": "gate_swa", "options": {"window": 8}})
    assert flat == nested and flat.options == {"window": 8}


BAD = [
    ("gate_swa", {"window": 0}, "window=0 is out of range"),
    ("gate_swa", {"window": -4}, "window=-4 is out of range"),
    ("gate_swa", {"window": 8, "pattern": "SSX"}, "names unknown layer kind(s) 'X'"),
    ("gate_swa", {"window": 8, "pattern": ["S", "F", "L", "S"]}, "names unknown layer kind(s) 'L'"),
    ("gate_swa", {"window": 8, "pattern": ["S", "F"]}, "lists 2 layers but the model has 4"),
    ("gate_swa", {"window": 8, "pattern": "auto:9"}, "K in auto:K must be an integer in [0, 4]"),
    ("gate_swa", {"gate": "neuron"}, "gate 'neuron' is unknown"),
    ("gate_swa", {"windw": 8}, "unknown option(s) 'windw' for target gate_swa"),
    ("mla", {"kv_lora_rank": 65}, "kv_lora_rank=65 is out of range; it must be in [1, 64]"),
    ("mla", {"kv_lora_rank": 16, "v_head_dim": 8}, "heads x v_head_dim = 4 x 8 = 32 differs from the teacher's o_proj input 64"),
    ("mla", {"kv_lora_rank": 16, "pattern": "MQ"}, "names unknown layer kind(s) 'Q'"),
    ("mla", {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 7}, "must be even"),
    ("mla", {"kv_lora_rank": 16, "init": "pca"}, "mla init 'pca' is unknown"),
]


@pytest.mark.parametrize("name,options,msg", BAD, ids=lambda x: str(x)[:40])
def test_bad_target_config_gives_one_clear_error(name, options, msg):
    cfg = families.config_for_preset("qwen3-debug")
    with pytest.raises(ConfigError) as e:
        get_target(name).validate(cfg, options)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_layout_errors():
    cfg = families.config_for_preset("qwen3-debug")
    opts = builder.BuildOptions(tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match="TP=2 must divide kv_lora_rank \\+ qk_pos_emb_head_dim = 17"):
        get_target("mla").validate_layout(cfg, {"kv_lora_rank": 9, "qk_pos_emb_head_dim": 8}, opts)
    with pytest.raises(ConfigError, match="resolve it with"):
        get_target("gate_swa").config_overrides(cfg, {"window": 8, "pattern": "auto:1"})


# --------------------------------------------------------------------------------------------
# GateSWA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_gate_swa_open_gate_and_full_window_reproduce_teacher(dense, gate):
    from megatron_attnedit.models.forward import forward_logits

    cfg, teacher = dense
    _, student = student_for(cfg, teacher, "gate_swa", {"window": SEQ, "pattern": "SF", "gate": gate})
    for a, b in paired_outputs(teacher, student, hidden()):
        assert (a - b).abs().max().item() <= TOL
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    diff = (forward_logits(student, tokens) - forward_logits(teacher, tokens)).abs().max().item()
    assert diff <= TOL


def test_students_of_the_moe_teacher(env, tiny_hf):
    """Targets only touch attention: MoE layers are copied and the open-gate student is the teacher."""
    from megatron_attnedit.models.forward import forward_logits

    cfg, teacher = teacher_from_hf(tiny_hf["moe"])
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ref = forward_logits(teacher, tokens)
    _, swa = student_for(cfg, teacher, "gate_swa", {"window": SEQ, "pattern": "SF"})
    assert (forward_logits(swa, tokens) - ref).abs().max().item() <= TOL
    _, mixed = student_for(cfg, teacher, "mla", {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8, "pattern": "GM"})
    assert torch.isfinite(forward_logits(mixed, tokens)).all()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_colocated_student_is_built_around_the_teachers_mlps(env, tiny_hf, monkeypatch, kind):
    """Attention-only training: the student's MLP/MoE modules are the teacher's from the moment the
    student is built (no second copy, even briefly), and the pair computes what a student built
    whole and initialised from the teacher computes. With trainable=all the student owns copies."""
    from megatron_attnedit.distill import colocate as col
    from megatron_attnedit.models.forward import forward_logits
    from megatron_attnedit.targets.student import build_student, init_student_from_teacher

    cfg = families.load_hf_config(tiny_hf[kind])
    load = col.hf_loader(tiny_hf[kind], cfg, builder.BuildOptions())
    tc = TargetConfig("gate_swa", {"window": 8, "pattern": "SF"})
    at_build = {}
    real_build = col.build_student

    def spy(*args, **kwargs):
        model = real_build(*args, **kwargs)
        at_build["new"] = {n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in at_build["teacher"]}
        at_build["mlps"] = [layer.mlp for layer in local_layers(model)]
        return model

    real_teacher = col.build_teacher

    def teacher_spy(*args, **kwargs):
        t = real_teacher(*args, **kwargs)
        at_build["teacher"] = col.storages(t)
        return t

    monkeypatch.setattr(col, "build_student", spy)
    monkeypatch.setattr(col, "build_teacher", teacher_spy)
    pair = col.colocate(cfg, tc, builder.BuildOptions(), load)
    teacher_mlps = [layer.mlp for layer in local_layers(pair.teacher)]
    assert all(s is t for s, t in zip(at_build["mlps"], teacher_mlps)) and len(teacher_mlps) == cfg["num_hidden_layers"]
    assert at_build["new"] and not any(".mlp." in n for n in at_build["new"]), sorted(at_build["new"])
    assert {f"decoder.layers.{i}.mlp" for i in range(cfg["num_hidden_layers"])} <= {gpt_layout_name(pair.student)(p) for p in pair.shared}
    assert not any(p.requires_grad for m in teacher_mlps for p in m.parameters())

    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(5))
    whole = build_student(cfg, tc, builder.BuildOptions())
    init_student_from_teacher(whole, pair.teacher, cfg, tc)
    assert (forward_logits(pair.student, tokens) - forward_logits(whole, tokens)).abs().max().item() <= TOL

    own = col.colocate(cfg, tc, builder.BuildOptions(), load, trainable="all")
    for s_mlp, t_mlp in zip([layer.mlp for layer in local_layers(own.student)], [layer.mlp for layer in local_layers(own.teacher)]):
        assert s_mlp is not t_mlp
        for (n, a), (_, b) in zip(s_mlp.named_parameters(), t_mlp.named_parameters()):
            assert a.requires_grad and torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n


def test_gate_swa_window_matches_dense_reference(dense):
    cfg, teacher = dense
    w = 5
    _, student = student_for(cfg, teacher, "gate_swa", {"window": w, "pattern": "SF"})
    x = hidden(1)
    for i, (lt, ls) in enumerate(zip(local_layers(teacher), local_layers(student))):
        box, h = capture_core_inputs(ls)
        xn = lt.input_layernorm(x)
        got = attention_forward(ls, xn, rotary_pos_emb_for(student, x.shape[0]))
        h.remove()
        q, k, v = (t.permute(1, 2, 0, 3) for t in box["qkv"])
        ref = core.reference_attention(q, k, v, ls.self_attention.core_attention.softmax_scale, w if i % 2 == 0 else None)
        ref = ref.permute(2, 0, 1, 3).reshape(x.shape[0], x.shape[1], -1)
        assert (got - ls.self_attention.linear_proj(ref)[0]).abs().max().item() <= TOL
        teacher_out = attention_forward(lt, xn, rotary_pos_emb_for(teacher, x.shape[0]))
        changed = (got - teacher_out).abs().max().item()
        assert (changed > 1e-3) if i % 2 == 0 else (changed <= TOL), f"layer {i}: {changed}"


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_gate_scales_heads(dense, gate):
    """Gate logits of -40 / +40 close a head / double it (2 sigmoid), other heads untouched."""
    cfg, teacher = dense
    _, student = student_for(cfg, teacher, "gate_swa", {"window": 7, "pattern": "S", "gate": gate})
    layer = local_layers(student)[0]
    attn = layer.self_attention
    width = 1 if gate == "head" else 16
    with torch.no_grad():
        attn.linear_gate.bias.view(4, width)[0] = -40.0
        attn.linear_gate.bias.view(4, width)[2] = 40.0
    x = layer.input_layernorm(hidden(2))
    box, h = capture_core_inputs(layer)
    got = attention_forward(layer, x, rotary_pos_emb_for(student, SEQ))
    h.remove()
    q, k, v = (t.permute(1, 2, 0, 3) for t in box["qkv"])
    o = core.reference_attention(q, k, v, attn.core_attention.softmax_scale, 7)  # [b, h, s, d]
    o[:, 0] = 0.0
    o[:, 2] *= 2.0
    expect = attn.linear_proj(o.permute(2, 0, 1, 3).reshape(SEQ, 2, 64))[0]
    assert (got - expect).abs().max().item() <= TOL


def test_sinks_change_only_where_they_should(dense):
    cfg, teacher = dense
    _, student = student_for(cfg, teacher, "gate_swa", {"window": 6, "pattern": "SF", "sinks": True})
    # Sinks start at -20: outputs equal the sink-free student's.
    _, plain = student_for(cfg, teacher, "gate_swa", {"window": 6, "pattern": "SF"})
    for (_, a), (_, b) in zip(paired_outputs(teacher, student, hidden(4)), paired_outputs(teacher, plain, hidden(4))):
        assert (a - b).abs().max().item() <= TOL
    for i, layer in enumerate(local_layers(student)):
        core_mod = layer.self_attention.core_attention
        with torch.no_grad():
            core_mod.softmax_offset.copy_(torch.tensor([0.5, float("-inf"), float("-inf"), float("-inf")]))
        box, h = capture_core_inputs(layer)
        attention_forward(layer, layer.input_layernorm(hidden(5)), rotary_pos_emb_for(student, SEQ))
        h.remove()
        q, k, v = (t.permute(1, 2, 0, 3) for t in box["qkv"])
        window = 6 if i % 2 == 0 else None
        scale = core_mod.softmax_scale
        with_sink = core.attention(q, k, v, scale, window, core_mod.softmax_offset)
        without = core.attention(q, k, v, scale, window, None)
        # heads without a sink: unchanged
        assert (with_sink[:, 1:] - without[:, 1:]).abs().max().item() <= 1e-6
        # head 0: every query loses the sink's share of probability, exactly as the reference says
        ref = core.reference_attention(q, k, v, scale, window, core_mod.softmax_offset)
        assert (with_sink - ref).abs().max().item() <= 1e-6
        shrink = with_sink[:, 0].norm(dim=-1) / without[:, 0].norm(dim=-1)
        assert (shrink < 1 - 1e-3).all() and (shrink > 0).all()


def test_auto_pattern_matches_transformers_attention(dense, tiny_hf):
    """auto:K picks the layers whose attention (as transformers computes it) reaches furthest."""
    from transformers import AutoModelForCausalLM

    from megatron_attnedit.targets.gate_swa import model as gate_swa

    cfg, teacher = dense
    w, k = 6, 2
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(7))
    ours = gate_swa.attention_mass_beyond_window(teacher, tokens, w, cfg["num_hidden_layers"])
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf["dense"], dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        attn = hf(tokens, output_attentions=True).attentions
    i = torch.arange(SEQ)
    beyond = (i[None, :] <= i[:, None] - w).float()
    theirs = [float((a * beyond).sum() / ((SEQ - w) * a.shape[0] * a.shape[1])) for a in attn]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-5
    resolved = gate_swa.resolve_auto_pattern(teacher, tokens, TargetConfig("gate_swa", {"window": w, "pattern": f"auto:{k}"}), cfg)
    assert resolved.options["pattern"] == gate_swa.choose_full_layers(theirs, k)
    assert resolved.options["pattern"].count("F") == k
    assert gate_swa.choose_full_layers([0.1, 0.3, 0.2, 0.3], 2) == ["S", "F", "S", "F"]


# --------------------------------------------------------------------------------------------
# KV accounting
# --------------------------------------------------------------------------------------------


def test_kv_figures_qwen3_8b():
    cfg = families.config_for_preset("qwen3-8b")
    gqa = get_target("gqa").kv_bytes_per_token(cfg, {}, 131072)
    assert gqa == 36 * 2 * 8 * 128 * 2 == 36 * 4096
    assert get_target("mla").kv_bytes_per_token(cfg, {}, 4096) == 36 * (512 + 64) * 2 == 36 * 1152
    swa = get_target("gate_swa")
    opts = {"window": 4096, "pattern": "SSSSSF"}
    assert swa.kv_bytes_per_token(cfg, opts, 4096) == gqa  # W >= context: nothing saved
    frac = swa.kv_bytes_per_token(cfg, opts, 131072) / gqa
    assert abs(frac - (1 / 6 + 5 / 6 * 4096 / 131072)) < 1e-12 and round(100 * frac) == 19


def test_kv_report_cli(tmp_path, capsys):
    from megatron_attnedit import kv_report

    (tmp_path / "config.json").write_text(json.dumps(families.config_for_preset("qwen3-8b")))
    assert kv_report.main(["--hf-dir", str(tmp_path), "--target", "gate_swa", "--window", "4096", "--pattern", "SSSSSF", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    by_ctx = {row["context"]: row for row in r["contexts"]}
    assert set(by_ctx) == {4096, 32768, 131072}
    assert r["teacher_bytes_per_token_per_layer"] == 4096
    assert round(100 * by_ctx[131072]["student_fraction"]) == 19
    assert by_ctx[131072]["teacher_bytes_per_sequence"] == 36 * 4096 * 131072
    assert kv_report.main(["--hf-dir", str(tmp_path), "--target", "mla", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert all(row["student_bytes_per_token_per_layer"] == 1152 for row in r["contexts"])
    assert kv_report.main(["--hf-dir", str(tmp_path), "--target", "mla"]) == 0
    assert "28.1%" in capsys.readouterr().out
    assert kv_report.main(["--hf-dir", str(tmp_path), "--target", "gate_swa", "--window", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: window=0 is out of range") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# Conversion tables and stage-1 parameters
# --------------------------------------------------------------------------------------------


TABLE_CASES = [
    ("gate_swa", {"window": 8, "pattern": "SF", "sinks": True, "gate": "channel"}),
    ("mla", {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8, "q_lora_rank": 32, "pattern": "MG"}),
    ("mla", {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8, "init": "random"}),
]


@pytest.mark.parametrize("name,options", TABLE_CASES, ids=lambda x: str(x)[:30])
def test_student_table_covers_the_student(dense, name, options):
    from megatron_attnedit.families import mapping
    from megatron_attnedit.convert.hf_io import trainable_items
    from megatron_attnedit.targets.student import student_table, trainable_attention_params

    cfg, teacher = dense
    tc, student = student_for(cfg, teacher, name, options)
    table = student_table(cfg, tc)
    names = {k for k, _ in trainable_items(student)}
    assert names == set(table.megatron_names())
    hf_names = table.hf_names()
    assert len(hf_names) == len(set(hf_names))
    for k, v in trainable_items(student):
        rule, layer, expert = table.rule_for(k)
        back = mapping.to_megatron(rule, mapping.to_hf(rule, v.detach(), table.shapes), table.shapes)
        assert torch.equal(back, v.detach())
    trainable = trainable_attention_params(student, tc)
    kinds = get_target(name).layer_kinds(cfg, tc.options)
    for layer, params in trainable.items():
        if kinds[layer] == "G":
            assert params == []
        else:
            assert params and all(p.requires_grad for p in params)
            assert any(p is q for q in params for p in local_layers(student)[layer].self_attention.parameters())
    if name == "gate_swa":
        assert any(p is local_layers(student)[0].self_attention.linear_gate.weight for p in trainable[0])


@pytest.mark.parametrize("target", [None, "mla", "gate_swa"])
def test_bf16_models_have_no_fp32_parameters(env, target):
    """Every parameter, the norms' included (megatron's local norms are born fp32), is in params_dtype:
    a bf16 input with an fp32 norm weight cannot use torch's fused rms_norm kernel on the GPU."""
    from megatron_attnedit.targets.student import build_student

    cfg = families.config_for_preset("qwen3-debug")
    opts = builder.BuildOptions(params_dtype=torch.bfloat16)
    options = {"kv_lora_rank": 32} if target == "mla" else {}
    model = builder.build_model(cfg, opts) if target is None else build_student(cfg, TargetConfig(target, options), opts)
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16}
    assert not wrong, wrong
    assert any("layernorm" in n for n, _ in model.named_parameters())
