"""Progressive distillation on CPU: co-location, stage 1 (teacher-forced, layer-wise) and stage 2 (KL).

Two drivers:
* ``workers/distill_run.py`` runs the objectives under megatron's schedule with a plain Adam on a
  fixed pool of micro-batches: fitting power of every layer, teacher forcing, storage sharing.
* the training loop itself (``megatron_attnedit/train.py`` under torchrun) on a small indexed
  dataset: stage 1 -> checkpoint -> stage 2, and the same first losses at TP=2 and PP=2 as at TP=1.
"""

import json
import os
import types

import pytest
import torch

from conftest import torchrun

TRAIN = "distill_train.py"
MLA_RANDOM = {"kv_lora_rank": 32, "init": "random"}
GATE_SWA = {"window": 8, "pattern": "SSSF"}


def drive(tmp_path, hf_dir, *args, nproc=1):
    out = tmp_path / f"run{len(list(tmp_path.glob('run*.pt')))}.pt"
    torchrun("distill_run.py", "--hf-dir", hf_dir, "--out", out, *args, nproc=nproc)
    return torch.load(out)


def layer_losses(metrics):
    return {k: v for k, v in metrics.items() if k.startswith("stage1/layer_")}


# ------------------------------------------------------------------------------------------------
# Stage 1 mechanics (schedule driver)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,options", [("mla", MLA_RANDOM), ("gate_swa", GATE_SWA)], ids=["mla", "gate_swa"])
def test_stage1_halves_every_layer_and_shares_frozen_weights(tiny_hf, tmp_path, target, options):
    r = drive(tmp_path, tiny_hf["dense"], "--target", target, "--target-options", json.dumps(options),
              "--steps", 30, "--lr", 3e-3, "--data-pool", 2, "--perturb-layer", 1)
    first, last = layer_losses(r["metrics"][0]), layer_losses(r["metrics"][-1])
    assert len(first) == 4
    for name, v0 in first.items():
        if v0 < 1e-6:  # a layer that starts equal to the teacher (GateSWA's full layer) stays there
            assert last[name] < 1e-6, (name, v0, last[name])
        else:
            assert last[name] <= 0.5 * v0, f"{target} {name}: normalized MSE {v0:.4f} -> {last[name]:.4f}, not halved"
    # one copy of every frozen weight: the pair holds the teacher's storages plus the new attention
    s = r["storages"]
    assert s["pair"] == s["teacher"] + s["attention"], s
    assert {"embedding", "output_layer", "decoder.final_layernorm", "decoder.layers.0.mlp"} <= set(s["shared"])
    # teacher forcing: noise on layer 1's attention changes layer 1's loss and nothing else
    before, after = r["perturb"]["before"], r["perturb"]["after"]
    assert after["stage1/layer_01"] > 2 * before["stage1/layer_01"] + 1e-3
    for name in ("stage1/layer_00", "stage1/layer_02", "stage1/layer_03"):
        assert after[name] == before[name], name


@pytest.mark.parametrize("target,options", [("mla", {"kv_lora_rank": 32, "init": "svd"}), ("gate_swa", GATE_SWA)], ids=["mla-svd", "gate_swa"])
def test_stage1_on_a_llama_teacher(tiny_hf, tmp_path, target, options):
    """Llama 3 (no q/k-norm, llama3 RoPE scaling, tied embeddings): stage 1 halves every layer's loss
    (MLA from the svd init, which has no q/k-norm to fold there), with one copy of the frozen weights."""
    r = drive(tmp_path, tiny_hf["llama"], "--target", target, "--target-options", json.dumps(options),
              "--steps", 30, "--lr", 3e-3, "--data-pool", 2)
    first, last = layer_losses(r["metrics"][0]), layer_losses(r["metrics"][-1])
    assert len(first) == 4
    for name, v0 in first.items():
        if v0 < 1e-6:
            assert last[name] < 1e-6, (name, v0, last[name])
        else:
            assert last[name] <= 0.5 * v0, f"{target} {name}: normalized MSE {v0:.4f} -> {last[name]:.4f}, not halved"
    s = r["storages"]
    assert s["pair"] == s["teacher"] + s["attention"], s


def test_stage2_on_a_llama_teacher(tiny_hf, tmp_path):
    r = drive(tmp_path, tiny_hf["llama"], "--stage", 2, "--target", "mla", "--target-options", json.dumps(MLA_RANDOM),
              "--steps", 15, "--data-pool", 2, "--lr", 3e-3)
    first, last = r["metrics"][0], r["metrics"][-1]
    assert last["stage2/kl"] < 0.5 * first["stage2/kl"], (first, last)


def test_sharing_with_moe_teacher(tiny_hf, tmp_path):
    r = drive(tmp_path, tiny_hf["moe"], "--target", "gate_swa", "--target-options", json.dumps(GATE_SWA), "--steps", 2)
    s = r["storages"]
    assert s["pair"] == s["teacher"] + s["attention"], s
    assert "decoder.layers.1.mlp" in s["shared"]  # routed experts + router: one copy
    assert all(v == v for v in r["metrics"][-1].values())


def test_stage2_lowers_kl(tiny_hf, tmp_path):
    r = drive(tmp_path, tiny_hf["dense"], "--stage", 2, "--stage2-options", json.dumps({"feature_layers": [1, -1]}),
              "--target", "mla", "--target-options", json.dumps(MLA_RANDOM), "--steps", 15, "--data-pool", 2, "--lr", 3e-3)
    first, last = r["metrics"][0], r["metrics"][-1]
    assert last["stage2/kl"] < 0.5 * first["stage2/kl"], (first, last)
    assert last["stage2/feature"] < first["stage2/feature"], (first, last)
    s = r["storages"]
    assert s["pair"] == s["teacher"] + s["attention"], s


def test_stage2_trainable_all_gives_the_student_its_own_copy(tiny_hf, tmp_path):
    r = drive(tmp_path, tiny_hf["dense"], "--stage", 2, "--stage2-options", json.dumps({"trainable": "all", "topk": 8}),
              "--target", "mla", "--target-options", json.dumps(MLA_RANDOM), "--steps", 2, "--data-pool", 2, "--lr", 1e-3)
    s = r["storages"]
    assert s["shared"] == [] and s["pair"] == s["teacher"] + s["student_alone"], s
    assert r["n_trainable"] == r["n_student"]
    assert r["metrics"][1]["stage2/kl"] < r["metrics"][0]["stage2/kl"]


def test_mismatched_teacher_and_student_give_one_clear_line():
    from megatron_attnedit.distill.colocate import check_configs, check_pair
    from megatron_attnedit.errors import ConfigError
    from megatron_attnedit.families import config_for_preset

    cfg = config_for_preset("qwen3-debug")
    for key, value, what in (("vocab_size", 512, "vocabulary size"), ("hidden_size", 128, "hidden size")):
        with pytest.raises(ConfigError) as e:
            check_configs(cfg, dict(cfg, **{key: value}))
        msg = str(e.value)
        assert "\n" not in msg and what in msg and str(value) in msg

    def fake(vocab, hidden):
        return types.SimpleNamespace(vocab_size=vocab, config=types.SimpleNamespace(hidden_size=hidden),
                                     decoder=types.SimpleNamespace(layers=[0, 0]))

    with pytest.raises(ConfigError, match=r"vocabulary size differ \(256 vs 300\)"):
        check_pair(fake(256, 64), fake(300, 64))
    with pytest.raises(ConfigError, match=r"hidden size differ \(64 vs 32\)"):
        check_pair(fake(256, 64), fake(256, 32))


def test_loading_changed_shared_weights_is_refused():
    from megatron_attnedit.distill.colocate import Colocated
    from megatron_attnedit.errors import ConfigError

    teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    student = torch.nn.Sequential(teacher[0], torch.nn.Linear(4, 4))  # layer 0 shared
    pair = Colocated(teacher=teacher, student=student, shared=["0"], trainable="attention")
    pair.fingerprint = pair.shared_fingerprint()
    with torch.no_grad():
        student[1].weight.add_(1.0)  # the student's own weights may change
        student[0].weight.copy_(student[0].weight.clone())  # equal values (a checkpoint of this pairing)
    pair.check_shared_unchanged()
    with torch.no_grad():
        student[0].weight.add_(1e-3)  # a checkpoint trained with trainable=all
    with pytest.raises(ConfigError, match="trainable=all"):
        pair.check_shared_unchanged()


# ------------------------------------------------------------------------------------------------
# Through the training loop: stage 1 -> checkpoint -> stage 2, at TP=1, TP=2 and PP=2
# ------------------------------------------------------------------------------------------------

RECIPE = """
model: {{hf_dir: {teacher}}}
target: {{name: mla, options: {{kv_lora_rank: 32, init: svd}}}}
data: {{data_path: [{prefix}], tokenizer_dir: {tokenizer}, split: "100,0,0", seq_length: 32, micro_batch_size: 2, global_batch_size: 4}}
optimizer: {{lr: 3.0e-4, min_lr: 3.0e-5, lr_warmup_iters: 0, lr_decay_style: constant, weight_decay: 0.0, clip_grad: 1.0}}
training: {{train_iters: 10, log_interval: 1, seed: 1234, platform: cpu}}
checkpoint: {{save_interval: 0, keep_last_n: 1}}
monitor: {{wandb_mode: disabled}}
stages:
  stage1: {{}}
  stage2:
    objective: {{options: {{feature_layers: [1]}}}}
"""


@pytest.fixture(scope="module")
def loop(tiny_hf, tmp_path_factory):
    """Runs the loop once per (stage, layout) on demand and caches its per-step metrics."""
    from training_data import make_corpus

    base = tmp_path_factory.mktemp("distill_loop")
    corpus = make_corpus(str(base / "data"), n_docs=60)
    recipe = base / "distill.yaml"
    recipe.write_text(RECIPE.format(teacher=tiny_hf["dense"], prefix=corpus["prefix"], tokenizer=corpus["tokenizer"]))
    cache = {}

    def run(stage, tp=1, pp=1, extra=(), dp=1):
        key = (stage, tp, pp, tuple(extra), dp)
        if key not in cache:
            run_dir = base / f"{stage}_tp{tp}_pp{pp}{'_' + str(len(cache)) if extra or dp > 1 else ''}"
            sets = [f"training.run_dir={run_dir}", f"parallel.tensor_model_parallel_size={tp}",
                    f"parallel.pipeline_model_parallel_size={pp}", *extra]
            if stage == "stage2":
                run("stage1")  # every layout starts stage 2 from the TP=1 stage-1 checkpoint
                sets.append(f"checkpoint.pretrained_checkpoint={base / 'stage1_tp1_pp1' / 'checkpoints'}")
            torchrun(TRAIN, "--recipe", recipe, "--stage", stage, "--set", *sets, nproc=tp * pp * dp)
            with open(run_dir / "metrics.jsonl") as f:
                cache[key] = [json.loads(line) for line in f]
        return cache[key]

    return run


def test_loop_stage1_lowers_loss(loop):
    # From the weights-only svd init: the calibrated one (the default, used by the layout tests
    # below) starts so close on this toy teacher that 10 steps at this lr move it by noise only.
    m = loop("stage1", extra=["target.options.calibration_tokens=0"])
    assert len(m) == 10 and all("stage1/layer_03" in x for x in m)
    loss = [x["loss"] for x in m]
    assert sum(loss[-3:]) < 0.9 * sum(loss[:3]), loss


def test_loop_stage2_runs_from_the_stage1_checkpoint(loop):
    m = loop("stage2")
    assert len(m) == 10 and {"stage2/kl", "stage2/feature"} <= set(m[0])
    for x in m:  # the whole-model loss is KL + the feature term (of a layer on pipeline stage 0 at PP=2)
        assert abs(x["loss"] - x["stage2/kl"] - x["stage2/feature"]) < 1e-6 * max(1.0, x["loss"])
    assert max(x["stage2/kl"] for x in m) < 0.03  # a student fresh from stage 1 is close to the teacher


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (2, 1, True), (1, 2, False)], ids=["tp2", "tp2sp", "pp2"])
def test_loop_layouts_give_tp1_losses(loop, stage, tp, pp, sp):
    ref = [x["loss"] for x in loop(stage)]
    got = [x["loss"] for x in loop(stage, tp, pp, extra=["parallel.sequence_parallel=true"] if sp else ())]
    assert len(got) == len(ref) == 10
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 0.01 * abs(a), f"{stage} TP={tp} PP={pp} SP={sp} step {i + 1}: {b} vs TP=1 {a}"


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_loop_overlapped_data_parallel_gives_dp1_losses(loop, stage):
    """Two data-parallel ranks with the gradient reduce and parameter gather overlapped (buckets of
    ~1K parameters; on for GPU/NPU by default): every trained parameter gets its gradient in each
    step (DDP's bucket hooks need that) and the losses follow the one-rank run."""
    ref = [x["loss"] for x in loop(stage)]
    got = [x["loss"] for x in loop(stage, dp=2, extra=["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
                                                       "parallel.ddp_bucket_size=1000"])]
    assert len(got) == len(ref) == 10
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 0.01 * abs(a), f"{stage} DP=2 overlapped step {i + 1}: {b} vs DP=1 {a}"


SELECTIVE = ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,layernorm,mlp]"]


NO_FEATURES = ["objective.options.feature_weight=0"]


@pytest.mark.parametrize("stage,base,recompute", [("stage1", [], SELECTIVE), ("stage2", [], SELECTIVE),
                                                  ("stage2", NO_FEATURES, ["model.recompute_granularity=full"])],
                         ids=["stage1_selective", "stage2_selective", "stage2_full"])
def test_loop_with_activation_recompute_gives_the_same_losses(loop, stage, base, recompute):
    """Stage 1 calls the students' attentions directly (core_attn recompute applies inside them);
    stage 2 runs the student's whole decoder, with its feature term under selective recompute, and
    under full recompute without it (refused, below) -- there the frozen embedding's output is what
    lets any gradient through (before that fix: no gradient, a step-2 loss of 0.00104 against 0.00154).
    tests/test_recompute.py counts the recomputation."""
    ref = [x["loss"] for x in loop(stage, extra=base)]
    got = [x["loss"] for x in loop(stage, extra=base + recompute)]
    assert len(got) == len(ref) == 10
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= 1e-5 * abs(a), f"{stage} with {recompute} step {i + 1}: {b} vs {a}"


def test_full_recompute_with_feature_matching_is_refused_in_one_line(tiny_hf, tmp_path):
    """Full recompute runs each layer's forward without gradient and again in the backward: the layer
    output the feature term's hook takes is the no-gradient one, so the term would train nothing.
    Refused before anything is built."""
    from megatron_attnedit.config import load_config
    from megatron_attnedit.errors import ConfigError
    from megatron_attnedit.distill.stage2 import Stage2Objective

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(teacher=tiny_hf["dense"], prefix=tmp_path / "none", tokenizer=tmp_path / "none"))
    cfg = load_config(str(recipe), ["model.recompute_granularity=full"], stage="stage2")
    with pytest.raises(ConfigError, match="feature_layers needs layer outputs with their gradient.*use selective recompute, or feature_weight: 0"):
        Stage2Objective(cfg.objective.options).build(cfg, None)


def test_gateswa_no_longer_than_its_window_is_warned_once(capsys):
    """At data.seq_length <= window every GateSWA sliding-window layer sees the whole sequence: the
    student equals the teacher (stage-1 loss exactly 0, measured at 8B shape) and learns nothing."""
    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.distill.colocate import _warn_if_nothing_to_learn
    from megatron_attnedit.families import config_for_preset

    cfg = config_for_preset("qwen3-debug")
    _warn_if_nothing_to_learn(TargetConfig("gate_swa", {"window": 16}), 16, cfg)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: target.options.window=16 >= data.seq_length=16")
    _warn_if_nothing_to_learn(TargetConfig("gate_swa", {}), 4096, cfg)  # the default window, 4096
    assert "window=4096 >= data.seq_length=4096" in capsys.readouterr().err
    _warn_if_nothing_to_learn(TargetConfig("gate_swa", {"window": 16}), 32, cfg)
    _warn_if_nothing_to_learn(TargetConfig("mla", {}), 16, cfg)
    assert capsys.readouterr().err == ""
