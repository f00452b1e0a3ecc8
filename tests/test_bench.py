"""launch/bench.sh end to end on CPU (tiny preset, one process): one JSON line with every run's
throughput fields and the step-time ratios; and the FLOP model against parameter counts."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "launch"))
import bench  # noqa: E402


def test_bench_sh_cpu_smoke(tmp_path):
    env = dict(os.environ, PRESET="qwen3-debug", PLATFORM="cpu", LAYERS="1", SEQ="32", GBS="2", ITERS="4",
               WORK=str(tmp_path / "work"), PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "bench.sh"), "--peak-tflops", "0.5"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON object per target
    r = json.loads(lines[0])
    assert r["device"] == "cpu" and r["nproc"] == 1 and r["target"]["name"] == "mla" and r["peak_tflops"] == 0.5
    for run in bench.RUNS:
        assert "error" not in r[run], r[run]
        for key in ("tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "model_tflops_per_gpu", "mfu", "peak_mem_GiB", "flops_per_token"):
            assert r[run][key] > 0 and math.isfinite(r[run][key]), (run, key, r[run][key])
        assert r[run]["step_time_s"] == pytest.approx(2 * 32 / r[run]["tokens_per_s"], rel=1e-2)
        assert r[run]["timed_steps"] == 2
    for ratio in ("step_time_ratio_stage2_over_lm", "step_time_ratio_stage1_over_teacher_fwd", "step_time_ratio_stage1_over_lm"):
        assert r[ratio] > 0 and math.isfinite(r[ratio]), (ratio, r[ratio])
    # the teacher forward alone is part of stage 1's work
    assert r["teacher_fwd"]["flops_per_token"] < r["stage1"]["flops_per_token"]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_benchmark_takes_its_training_run_with_it(tmp_path, how):
    """A run is in its own session (so the benchmark can stop it as a group); a benchmark stopped by a
    time limit -- SIGTERM from ``timeout``, or SIGKILL -- must not leave it running (on a GPU it held the
    memory the next benchmark needed)."""
    import signal
    import time

    import psutil

    env = dict(os.environ, PRESET="qwen3-debug", PLATFORM="cpu", LAYERS="1", SEQ="32", GBS="2", ITERS="100000",
               CONFIGS="lm", WORK=str(tmp_path / "work"), PYTHONWARNINGS="ignore")
    bench_proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "bench.sh")], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # bench.sh execs bench.py: this pid is the benchmark
    metrics = tmp_path / "work" / "lm" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.stat().st_size > 0):  # the run is training
        assert bench_proc.poll() is None and time.time() < deadline, "the benchmark ended or never started its run"
        time.sleep(0.5)
    runs = psutil.Process(bench_proc.pid).children(recursive=True)
    assert runs, "no training process under the benchmark"
    bench_proc.send_signal(getattr(signal, how))
    bench_proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(runs, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} training process(es) outlived the benchmark ({how})"
    if how == "SIGTERM":
        assert bench_proc.returncode == 128 + signal.SIGTERM


def _hf_linear_params(preset):
    """2-D weights of the HF model other than the input embedding; routed experts at top-k / E."""
    import torch
    import transformers

    from megatron_attnedit import families

    cfg = families.config_for_preset(preset)
    cls = transformers.Qwen3MoeConfig if cfg["model_type"] == "qwen3_moe" else transformers.Qwen3Config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cls(**{k: v for k, v in cfg.items() if k != "architectures"}))
    active = cfg.get("num_experts_per_tok", 0) / max(1, cfg.get("num_experts", 1))
    n = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue
        n += p.numel() * (active if ".experts." in name else 1.0)
    return cfg, n


@pytest.mark.parametrize("preset", ["qwen3-debug", "qwen3-moe-debug", "qwen3-30b-a3b"])
def test_teacher_flops_are_twice_the_active_weights(preset):
    """Matmul FLOPs of one forward without attention scores = 2 x weights a token meets: for MoE the
    router and the top-k experts only (Qwen3-30B-A3B: ~3.0B besides the embedding)."""
    cfg, n = _hf_linear_params(preset)
    f = bench.Flops(cfg, {"name": "gate_swa", "options": {"pattern": "F"}}, seq=1)
    assert sum(f.t_proj) + sum(f.mlp) + f.out == pytest.approx(2 * n, rel=1e-9)
    if preset == "qwen3-30b-a3b":
        assert 2.9e9 < n < 3.1e9


def test_flop_model_counts_windows_and_frozen_weights():
    cfg = dict(bench.preset("qwen3-8b"), num_hidden_layers=6)
    full = bench.Flops(cfg, {"name": "gate_swa", "options": {"window": 4096, "pattern": "F"}}, seq=16384)
    swa = bench.Flops(cfg, {"name": "gate_swa", "options": {"window": 4096, "pattern": "SSSSSF"}}, seq=16384)
    assert bench.mean_keys(16384) == 8192.5 and bench.mean_keys(8, 2) == (1 + 2 * 7) / 8
    assert sum(swa.s_score) < 0.6 * sum(full.s_score)
    p_att, p_all = swa.per_token("attention"), swa.per_token("all")
    frozen = sum(swa.mlp) + swa.out  # weight gradients skipped with trainable: attention
    assert p_all["stage2"] - p_att["stage2"] == pytest.approx(frozen + swa.s_input[0])  # + layer 0's input gradient
    attn = sum(3 * (p + s) for p, s in zip(swa.s_proj, swa.s_score))
    assert p_att["stage1"] == pytest.approx(p_att["teacher_fwd"] + attn - sum(swa.s_input))  # no input gradients
    assert p_all["stage2"] == pytest.approx(p_all["teacher_fwd"] + swa.out + p_all["lm"])  # teacher + full training step


def test_teacher_forward_options_are_checked():
    from megatron_attnedit.errors import ConfigError
    from megatron_attnedit.training.objective import create

    assert create("teacher_forward", {}).options == {"output_layer": False}
    with pytest.raises(ConfigError, match="output_layer must be true or false"):
        create("teacher_forward", {"output_layer": "yes"})
    with pytest.raises(ConfigError, match="did you mean 'output_layer'"):
        create("teacher_forward", {"output_layers": True})
