"""Student exports (checkpoints_tools/mcore_to_hf.py on a checkpoint whose metadata names a target).

MLA -> stock transformers DeepseekV2ForCausalLM (no remote code); GateSWA -> Qwen3 / Qwen3-MoE / Llama plus
the shipped configuration_gateswa.py / modeling_gateswa.py (trust_remote_code). For dense, MoE and
Llama 3 teachers: logits parity with the megatron student (fp32, CPU, <= 1e-4), offline loading with
AutoModelForCausalLM, greedy generation whose cached steps equal a full forward (so the sliding-
window cache is right), and bad target metadata ending in one error line with nothing written.

Two processes: tests/workers/export_students.py (megatron: build, perturb, save, export; the bad
cases through the CLI) and tests/workers/export_hf_check.py (transformers only, offline).
"""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import ROOT

TOL = 1e-4
CASES = ["mla-dense", "mla-dense-qlora-tied", "mla-moe", "mla-moe-nonorm", "gateswa-dense", "gateswa-moe", "gqa-dense", "mla-llama", "gateswa-llama"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    w = tmp_path_factory.mktemp("export")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    worker = lambda name, *args, **kw: subprocess.run(  # noqa: E731
        [sys.executable, os.path.join(ROOT, "tests", "workers", name), str(w), *args], capture_output=True, text=True, timeout=600, **kw)
    proc = worker("export_students.py", env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # the user's view: no network, remote code cached in a fresh directory
    offline = dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(w / "modules"), HF_HOME=str(w / "hf_home"))
    proc = worker("export_hf_check.py", *CASES, env=offline)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return w, json.load(open(w / "result.json")), json.load(open(w / "hf_check.json"))


def _config(w, case):
    return json.load(open(w / case / "hf" / "config.json"))


def _hf_keys(w, case):
    index = json.load(open(w / case / "hf" / "model.safetensors.index.json"))
    return set(index["weight_map"])


@pytest.mark.parametrize("case", CASES)
def test_logits_match_megatron(exports, case):
    w, _, hf = exports
    r = hf[case]
    if case == "mla-moe":
        # norm_topk_prob: exact under DeepSeek's renormalising router (vLLM, SGLang, DeepSeek's code);
        # transformers' DeepseekV2 ignores the flag -- pinned so that a fix in transformers shows up here
        assert r["max_diff_renormalised"] <= TOL, r
        assert r["max_diff"] > 1e-3, r
    else:
        assert r["max_diff"] <= TOL, r


@pytest.mark.parametrize("case", CASES)
def test_loads_offline_and_generates_with_cache(exports, case):
    w, _, hf = exports
    r = hf[case]
    if case.startswith("mla"):
        assert r["class"] == "DeepseekV2ForCausalLM" and r["module"].startswith("transformers.models.deepseek_v2.") and not r["remote_code"]
        assert not [f for f in os.listdir(w / case / "hf") if f.endswith(".py")]
    elif case.startswith("gqa"):
        assert r["class"] == "Qwen3ForCausalLM" and not r["remote_code"]
    else:
        assert r["class"] in ("GateSWAForCausalLM", "GateSWAMoeForCausalLM", "GateSWALlamaForCausalLM") and r["remote_code"]
        assert r["module"].startswith("transformers_modules.") and r["module"].endswith(".modeling_gateswa")
    assert len(r["generated"]) == 14
    # 10 prompt + 14 new tokens > window (8 / 6): sliding layers decode from a truncated cache
    assert r["cache_vs_full_forward"] <= TOL, r
    assert r["generated"] == r["generated_uncached"], r
    # the cache is filled: every position of the 10-token prompt in full layers, W - 1 in sliding
    # ones (transformers keeps W - 1; the next token makes W). An attention that reads the cache
    # under another keyword than transformers passes leaves it empty (transformers 5.25).
    cfg = _config(w, case)
    kinds = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    expected = [10 if k == "full_attention" else min(10, cfg["sliding_window"] - 1) for k in kinds]
    assert r["cached_positions"] == expected, r



@pytest.mark.parametrize("case", CASES)
def test_decode_engine_on_the_export(exports, case):
    """The decode engine (megatron_attnedit/inference) on each real export: its steps equal the full
    forward for both prompts (24 positions, past every window), it picks the tokens transformers'
    generate picks, and its cache is the target's formula in every layer."""
    from megatron_attnedit.inference import kv

    w, _, hf = exports
    r = hf[case]
    assert r["engine"]["ok"] and r["engine"]["tokens_equal"] and r["engine"]["steps"] == 14, r["engine"]
    assert r["engine_generated"] == r["generated"]
    c = r["engine_cache"]
    assert c["positions"] == c["allocated_positions"] == 23 and c["batch"] == 2
    assert c["measured_per_layer"] == kv.formula_per_layer(_config(w, case), 23, 4), c


def test_deepseek_config_expresses_the_student(exports):
    w, _, _ = exports
    dense, tied, moe, nonorm = (_config(w, c) for c in ("mla-dense", "mla-dense-qlora-tied", "mla-moe", "mla-moe-nonorm"))
    assert dense["model_type"] == "deepseek_v2" and dense["architectures"] == ["DeepseekV2ForCausalLM"]
    # dense teacher: every layer dense
    assert dense["first_k_dense_replace"] == dense["num_hidden_layers"] == 4
    # rope_frequencies high: theta^(dr/hd) = 10000^(8/16); uniform: the teacher's theta; no yarn
    assert dense["rope_parameters"] == {"rope_type": "default", "rope_theta": 100.0} and dense["rope_theta"] == 100.0
    assert tied["rope_parameters"]["rope_theta"] == 10000.0 and tied["tie_word_embeddings"] is True
    assert (dense["q_lora_rank"], dense["kv_lora_rank"], dense["qk_nope_head_dim"], dense["qk_rope_head_dim"], dense["v_head_dim"]) == (None, 32, 16, 8, 16)
    # a dense student has no router: no expert-group keys (llama.cpp's loader asserts on them), no routing keys
    for c in (dense, tied):
        assert not {"n_group", "topk_group", "topk_method", "scoring_func", "routed_scaling_factor"} & set(c), c
        assert c["n_routed_experts"] == 0
    assert tied["q_lora_rank"] == 32
    # Qwen3-MoE routing: softmax over experts, greedy top-k, no shared experts, mlp_only_layers [0] -> dense prefix
    for c, norm in ((moe, True), (nonorm, False)):
        assert (c["scoring_func"], c["topk_method"], c["n_group"], c["topk_group"], c["routed_scaling_factor"]) == ("softmax", "greedy", 1, 1, 1.0)
        assert (c["first_k_dense_replace"], c["n_routed_experts"], c["num_experts_per_tok"], c["n_shared_experts"]) == (1, 4, 2, 0)
        assert c["norm_topk_prob"] is norm
    # no q/k norm: the latent norms only
    keys = _hf_keys(w, "mla-dense")
    assert not [k for k in keys if "q_norm" in k or "k_norm" in k]
    assert {"model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.self_attn.q_proj.weight"} <= keys
    assert "lm_head.weight" not in _hf_keys(w, "mla-dense-qlora-tied") and "model.layers.0.self_attn.q_a_layernorm.weight" in _hf_keys(w, "mla-dense-qlora-tied")
    moe_keys = _hf_keys(w, "mla-moe")
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in moe_keys and "model.layers.0.mlp.gate_proj.weight" in moe_keys
    index = json.load(open(w / "mla-moe" / "hf" / "model.safetensors.index.json"))["weight_map"]
    with safe_open(str(w / "mla-moe" / "hf" / index["model.layers.1.mlp.shared_experts.down_proj.weight"]), "pt") as f:
        assert tuple(f.get_slice("model.layers.1.mlp.shared_experts.down_proj.weight").get_shape()) == (64, 0)


@pytest.mark.parametrize("case", CASES)
def test_every_tensor_is_the_declared_dtype(exports, case):
    """config.json's dtype is the dtype of every tensor written (tests/test_export_dtype.py: when the
    stored and declared dtypes differ)."""
    w, _, _ = exports
    from test_export_dtype import check_every_tensor

    declared, tensors = check_every_tensor(str(w / case / "hf"))
    assert declared == "float32" and tensors


def test_gateswa_config_and_files(exports):
    w, _, _ = exports
    dense, moe = _config(w, "gateswa-dense"), _config(w, "gateswa-moe")
    assert dense["model_type"] == "qwen3_gateswa" and dense["auto_map"]["AutoModelForCausalLM"] == "modeling_gateswa.GateSWAForCausalLM"
    assert moe["model_type"] == "qwen3_moe_gateswa" and moe["auto_map"]["AutoConfig"] == "configuration_gateswa.GateSWAMoeConfig"
    assert dense["layer_types"] == ["sliding_attention", "full_attention"] * 2 and dense["sliding_window"] == 8 and dense["use_sliding_window"]
    assert moe["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"] and moe["sliding_window"] == 6
    assert (dense["output_gate"], dense["attention_sinks"], moe["output_gate"], moe["attention_sinks"]) == ("head", True, "channel", False)
    llama = _config(w, "gateswa-llama")
    assert llama["model_type"] == "llama_gateswa" and llama["auto_map"]["AutoModelForCausalLM"] == "modeling_gateswa.GateSWALlamaForCausalLM"
    assert llama["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert llama["rope_parameters"]["rope_type"] == "llama3"  # the teacher's RoPE, kept
    for case in ("gateswa-dense", "gateswa-moe", "gateswa-llama"):
        assert {"configuration_gateswa.py", "modeling_gateswa.py"} <= set(os.listdir(w / case / "hf"))
    keys = _hf_keys(w, "gateswa-dense")
    assert {"model.layers.0.self_attn.output_gate.weight", "model.layers.0.self_attn.output_gate.bias", "model.layers.0.self_attn.sinks"} <= keys
    assert "model.layers.0.self_attn.sinks" not in _hf_keys(w, "gateswa-moe")


BAD = {
    # case (metadata edited in a good checkpoint): a piece of the one error line
    "target-missing-mla": "holds the attention weights of an MLA student but its metadata names no attention target",
    "target-missing-gateswa": "holds the attention weights of a GateSWA student but its metadata names no attention target",
    "options-mismatch-shapes": "its target metadata (mla {'kv_lora_rank': 16, 'qk_pos_emb_head_dim': 8}) does not match its weights",
    "sinks-mismatch": "softmax_offset, which the model from its config does not have",
    "unknown-target": "names attention target 'linear_attention', which is unknown",
    "bad-option": "gate 'sideways' is unknown",
    "unknown-option": "unknown option(s) 'kv_rank' for target mla",
    "options-without-target": "target_options but no target name",
    "mixed-mla-gqa": "only all-MLA students (pattern: M) export",
    "dense-layers-not-prefix": "first_k_dense_replace can only make the first k layers dense",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_target_metadata_one_line_nothing_written(exports, name):
    w, result, _ = exports
    r = result["bad"][name]
    lines = r["stderr"].splitlines()
    assert r["rc"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    assert BAD[name] in lines[0], lines[0]
    out = w / "out"
    assert not (out / name).exists() and not [n for n in (os.listdir(out) if out.exists() else []) if ".partial-" in n]


def test_export_reports_and_notes(exports):
    _, result, _ = exports
    # only the norm_topk_prob export and the Llama MLA export (rms_norm_eps 1e-5) warn, in one line each
    assert [c for c in CASES if result[c]["stderr"]] == ["mla-moe", "mla-llama"]
    assert result["mla-moe"]["stderr"].count("\n") == 1 and "norm_topk_prob" in result["mla-moe"]["stderr"]
    assert result["mla-llama"]["stderr"].count("\n") == 1 and "rms_norm_eps 1e-05" in result["mla-llama"]["stderr"]
