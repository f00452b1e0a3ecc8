"""Every shipped full-size recipe can start: its layout divides the model it names, and its teacher
and student build at full shape (on the meta device: names and shapes, no memory).

For each recipe of launch/recipes/qwen3_8b*.yaml and qwen3_30b_a3b*.yaml, and each of its stages:
the parallel layout against heads, KV heads, layers and experts (``builder.check_parallel``), against
the number of GPUs the recipe is written for (its header: one node of 8 for 8B, 2 nodes x 8 for
30B-A3B) -- world divisible by TP x PP, EP dividing TP x DP, the global batch by micro-batch x DP --
and the target's own TP rules; then the whole student and teacher built on the meta device at the
preset's full depth, with their parameter counts checked against the published totals (Qwen3-8B
8.19B, Qwen3-30B-A3B 30.53B) and the student's attention against the target's shapes. A recipe that
could not start on its cluster fails here, in CI, not after queueing for the cluster.
"""

import glob
import os

import pytest

from conftest import ROOT
from megatron_attnedit import platform
from megatron_attnedit.config import TargetConfig
from megatron_attnedit.targets import get_target
from megatron_attnedit.config import load_config
from megatron_attnedit.models import builder
from megatron_attnedit import families
from megatron_attnedit.families import table

RECIPES = sorted(glob.glob(os.path.join(ROOT, "launch", "recipes", "qwen3_8b*.yaml"))
                 + glob.glob(os.path.join(ROOT, "launch", "recipes", "qwen3_30b_a3b*.yaml")))
# GPUs each family's recipes are written for (their headers), and the published parameter counts.
FAMILY = {
    "qwen3_8b": dict(preset="qwen3-8b", gpus=8, params=8.19e9),
    "qwen3_30b_a3b": dict(preset="qwen3-30b-a3b", gpus=16, params=30.53e9),
}


def _family(path):
    name = os.path.basename(path)
    return next(v for k, v in FAMILY.items() if name.startswith(k))


def _stages(path):
    import yaml

    with open(path) as f:
        stages = list((yaml.safe_load(f) or {}).get("stages") or {})
    return stages or [None]


CASES = [(p, s) for p in RECIPES for s in _stages(p)]


def _config(path, stage):
    fam = _family(path)
    sets = ["model.hf_dir=null", f"model.preset={fam['preset']}", "data.tokenizer_dir=/unused/tokenizer.model"]
    return load_config(path, sets, stage), fam


def test_every_shipped_full_size_recipe_is_covered():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"qwen3_8b.yaml", "qwen3_8b_mla.yaml", "qwen3_8b_gateswa.yaml", "qwen3_30b_a3b.yaml",
            "qwen3_30b_a3b_mla.yaml", "qwen3_30b_a3b_gateswa.yaml"} <= names, names


@pytest.mark.parametrize("path,stage", CASES, ids=[f"{os.path.basename(p)[:-5]}-{s}" for p, s in CASES])
def test_layout_divides_on_the_gpus_the_recipe_names(path, stage):
    cfg, fam = _config(path, stage)
    hf = families.config_for_preset(fam["preset"])
    par = cfg.parallel
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    builder.check_parallel(hf, tp, pp, ep)
    world = fam["gpus"]
    assert world % (tp * pp) == 0, f"{world} GPUs are not a multiple of TP x PP = {tp} x {pp}"
    dp = world // (tp * pp)
    assert (tp * dp) % ep == 0, f"EP={ep} does not divide TP x DP = {tp * dp}"
    d = cfg.data
    assert d.global_batch_size % (d.micro_batch_size * dp) == 0, (
        f"global batch {d.global_batch_size} is not a multiple of micro-batch {d.micro_batch_size} x DP {dp}")
    if par.sequence_parallel:
        assert tp > 1 and d.seq_length % tp == 0
    if cfg.target.name:
        # the target's own checks at this TP (e.g. MLA: TP divides the latent projection)
        t = get_target(cfg.target.name)
        t.validate(hf, dict(cfg.target.options))
        t.validate_layout(hf, dict(cfg.target.options), builder.BuildOptions(tensor_model_parallel_size=tp))


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def megatron_tp1():
    platform.init_distributed(platform.init_platform("cpu"))


def _attention_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".self_attention." in n)


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p)[:-5] for p in RECIPES])
def test_teacher_and_student_build_at_full_shape(path, megatron_tp1):
    from megatron_attnedit.convert.layout import build_meta_model

    cfg, fam = _config(path, None)
    hf = families.config_for_preset(fam["preset"])
    padded = table.padded_vocab_size(hf["vocab_size"], cfg.parallel.tensor_model_parallel_size)
    teacher = build_meta_model(hf, padded)
    n_teacher = _params(teacher)
    # published totals count the unpadded vocabulary (embedding and output layer)
    unpadded = n_teacher - 2 * (padded - hf["vocab_size"]) * hf["hidden_size"]
    assert abs(unpadded - fam["params"]) <= 0.005 * fam["params"], f"{unpadded / 1e9:.3f}B parameters"
    assert sum(1 for n, _ in teacher.named_parameters() if n.endswith("input_layernorm.weight")) == hf["num_hidden_layers"]
    if not cfg.target.name:
        return
    target = TargetConfig(cfg.target.name, dict(cfg.target.options))
    student = build_meta_model(hf, padded, target)
    layers = hf["num_hidden_layers"]
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    o = dict(cfg.target.options)
    if target.name == "mla":
        nope, rope, v, rank = o["qk_head_dim"], o["qk_pos_emb_head_dim"], o["v_head_dim"], o["kv_lora_rank"]
        per_layer = (h * heads * (nope + rope)  # full-rank query
                     + h * (rank + rope) + rank  # latent + RoPE key projection, latent norm
                     + rank * heads * (nope + v)  # key / value up-projection
                     + heads * v * h)  # output projection (inherited from the teacher)
        assert _attention_params(student) == layers * per_layer
    else:
        # GateSWA: the teacher's attention plus one gate per head (weights and bias), sinks if on
        gate = (h + 1) * heads * (1 if o.get("gate", "head") == "head" else hf["head_dim"])
        sinks = heads if o.get("sinks") else 0
        assert _attention_params(student) == _attention_params(teacher) + layers * (gate + sinks)
    assert _params(student) - _attention_params(student) == n_teacher - _attention_params(teacher)
