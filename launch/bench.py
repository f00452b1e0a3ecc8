"""Distillation throughput at a real model shape on one GPU; prints one JSON object.

    python launch/bench_distill.py --preset qwen3-8b --layers 8 --target mla --seq 4096
    bash launch/bench_distill.sh                 # the same with the defaults below

Random weights (a preset with ``--layers`` layers), random tokens. Runs the project's own training
entry point (``python -m megatron_attnedit.train``) three times on the same student and data:
  lm      plain next-token CE of the student (the baseline training step)
  stage1  teacher forward + every layer's attention trained on the teacher's activations
  stage2  teacher forward + full student forward/backward with the KL objective
and reads each run's metrics.jsonl. Reported per run: tokens/s (median over the timed steps), model
TFLOP/s and MFU counting the teacher's forward, peak GPU memory; and the ratios stage2/lm and
stage1/lm of step time.

FLOPs per token (matmuls only, as Megatron-LM counts them): a forward of N non-embedding
parameters plus the output layer is 2N; causal attention scores add 2 * 2 * s/2 * heads * d per
layer (QK^T and PV over on average s/2 keys; windowed layers over min(W, s/2)); backward costs twice
the forward. stage1 trains attention only: student attention forward + backward (x3) on every
layer, plus the teacher forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data(work: str, vocab: int, seq: int, n_docs: int) -> tuple:
    """Random-token indexed dataset + a tiny SentencePiece model (only its EOS id is used)."""
    import numpy as np
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(work, exist_ok=True)
    prefix = os.path.join(work, "random_tokens")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(n_docs):
        builder.add_document(torch.from_numpy(rng.integers(3, vocab, size=seq + 1, dtype=np.int32)), [seq + 1])
    builder.finalize(prefix + ".idx")
    text = os.path.join(work, "sp.txt")
    with open(text, "w") as f:
        for i in range(2000):
            f.write(" ".join(f"w{(i * 7 + j) % 97}" for j in range(20)) + "\n")
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(work, "sp"), vocab_size=64, minloglevel=2)
    return prefix, os.path.join(work, "sp.model")


def run(name: str, recipe: str, stage: str | None, sets: list, work: str) -> dict:
    run_dir = os.path.join(work, name)
    cmd = [sys.executable, "-m", "megatron_attnedit.train", "--recipe", recipe]
    if stage:
        cmd += ["--stage", stage]
    cmd += ["--set", *sets, f"training.run_dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + len(name)))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    timed = rows[2:] if len(rows) > 3 else rows[-1:]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_mem_GiB": max((r.get("memory_gb") or r.get("mem_gb") or 0) for r in rows),
        "loss_first_last": [rows[0].get("loss"), rows[-1].get("loss")],
        "wall_s": round(time.time() - t0, 1),
    }


def flops_per_token(cfg: dict, target: dict, seq: int) -> dict:
    """Forward FLOPs per token of the teacher, the student, and the student's attention alone."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    ffn, V = cfg["intermediate_size"], cfg["vocab_size"]
    t_attn_proj = 2 * (h * (nh + 2 * nkv) * d + nh * d * h)
    score = 2 * 2 * (seq / 2) * nh * d
    mlp = 2 * 3 * h * ffn
    out = 2 * h * V
    o = target.get("options", {})
    if target["name"] == "mla":
        q = o.get("qk_head_dim", 128) + o.get("qk_pos_emb_head_dim", 64)
        r, dr, v = o.get("kv_lora_rank", 512), o.get("qk_pos_emb_head_dim", 64), o.get("v_head_dim", 128)
        s_attn_proj = 2 * (h * nh * q + h * (r + dr) + r * nh * (o.get("qk_head_dim", 128) + v) + nh * v * h)
        s_score = 2 * (seq / 2) * nh * (q + v)
    else:
        w = o.get("window", 4096)
        pattern = o.get("pattern", "SSSSSF")
        frac_s = pattern.count("S") / len(pattern)
        s_attn_proj = t_attn_proj + 2 * h * nh  # + per-head gate
        s_score = frac_s * 2 * 2 * min(w, seq / 2) * nh * d + (1 - frac_s) * score
    teacher = L * (t_attn_proj + score + mlp) + out
    student = L * (s_attn_proj + s_score + mlp) + out
    return {"teacher": teacher, "student": student, "student_attention": L * (s_attn_proj + s_score)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--target", default="mla", choices=["mla", "gate_swa"])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--gbs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--work", default="/tmp/attnedit_bench")
    ap.add_argument("--runs", default="lm,stage1,stage2")
    ap.add_argument("--recipe", default=None, help="recipe whose target section is used (default: the preset's MLA/GateSWA recipe)")
    ap.add_argument("--platform", default="cuda")
    ap.add_argument("--profile", action="store_true", help="profile steps 3-4 of each run (table to <work>/<run>/profile/)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    a = ap.parse_args()

    import torch

    from megatron_attnedit.models import qwen3

    cfg = qwen3.config_for_preset(a.preset)
    cfg["num_hidden_layers"] = a.layers
    recipe = a.recipe or ({"mla": "qwen3_8b_mla", "gate_swa": "qwen3_8b_gateswa"}[a.target] if a.preset == "qwen3-8b" else
                          {"mla": "qwen3_30b_a3b_mla", "gate_swa": "qwen3_30b_a3b_gateswa"}[a.target])
    from megatron_attnedit.config import load_config

    target = load_config(recipe, ["model.hf_dir=null", f"model.preset={a.preset}", "data.tokenizer_dir=x"], "stage1").target
    target = {"name": target.name, "options": dict(target.options)} if hasattr(target, "name") else dict(target)
    n_docs = a.gbs * (a.iters + 2) * 2
    prefix, sp = make_data(a.work, cfg["vocab_size"], a.seq, n_docs)
    common = [
        "model.hf_dir=null", f"model.preset={a.preset}", f"model.overrides={{num_hidden_layers: {a.layers}}}",
        "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
        f"data.data_path=[{prefix}]", f"data.tokenizer_dir={sp}", f"data.seq_length={a.seq}", 'data.split="100,0,0"',
        f"data.micro_batch_size={a.mbs}", f"data.global_batch_size={a.gbs}",
        f"training.train_iters={a.iters}", "training.log_interval=1", "training.eval_interval=0", f"training.platform={a.platform}",
        "optimizer.lr_warmup_iters=1", "checkpoint.save_interval=0", "monitor.wandb_mode=disabled", "checkpoint.pretrained_checkpoint=null",
    ]
    result = {"device": torch.cuda.get_device_name() if a.platform == "cuda" else a.platform, "preset": a.preset, "layers": a.layers, "seq": a.seq,
              "global_batch": a.gbs, "micro_batch": a.mbs, "target": target}
    fl = flops_per_token(qwen3.config_for_preset(a.preset) | {"num_hidden_layers": a.layers}, target, a.seq)
    per_token = {
        "lm": 3 * fl["student"],
        "stage1": fl["teacher"] + 3 * fl["student_attention"],
        "stage2": fl["teacher"] + 3 * fl["student"],
    }
    if a.profile:
        common.append("training.profile_steps=[3,4]")
    for name in a.runs.split(","):
        stage = None if name == "lm" else name
        sets = common + (["objective.name=lm"] if name == "lm" else [])
        r = run(name, recipe, stage, sets, a.work)
        if "tokens_per_s" in r:
            tf = r["tokens_per_s"] * per_token[name] / 1e12
            r.update(model_tflops=round(tf, 1), mfu=round(tf / a.peak_tflops, 4), flops_per_token=per_token[name])
            r["tokens_per_s"] = round(r["tokens_per_s"], 1)
        result[name] = r
        print(f"[bench] {name}: {r}", file=sys.stderr, flush=True)
    if all("tokens_per_s" in result.get(k, {}) for k in ("lm", "stage2")):
        result["step_time_ratio_stage2_over_lm"] = round(result["lm"]["tokens_per_s"] / result["stage2"]["tokens_per_s"], 3)
    if all("tokens_per_s" in result.get(k, {}) for k in ("lm", "stage1")):
        result["step_time_ratio_stage1_over_lm"] = round(result["lm"]["tokens_per_s"] / result["stage1"]["tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
