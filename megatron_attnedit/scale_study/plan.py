"""The scale study's sizes (GPU and ``--tiny``) and the wall-time estimate printed before it runs.

Teacher (GPU): Qwen3, 12 layers, hidden 768, 12 query heads x 64 sharing 4 KV heads (3 per KV
head), q/k RMSNorm, SwiGLU 2048, vocab 4096 (the bundled tokenizer), untied embeddings: 81.8M
parameters. Why this size: of the 9 minutes on one H100, about 3 go to the teacher (the data,
five stage runs, four exports and the evaluation take the rest). The compute-optimal model for 3
minutes at ~300 TFLOP/s (~5e16 FLOPs; Chinchilla's ~20 tokens per parameter) is ~20M parameters,
below the 60M the issue asks for, so the teacher sits near the bottom of the range, where every
extra parameter costs tokens it sees (0.6 per parameter here): at 82M and ~700 MFLOP per token
(6N plus causal attention at 4096) the estimate is ~400K tokens/s: 390 steps of 32 x 4096 tokens
= 51M tokens in ~130 s, under one pass over the package corpus (no token seen twice). A
head_dim of 64 with 4 KV heads makes both conversions non-trivial: the KV per token and layer is
2 x 4 x 64 = 512 values, the MLA latent keeps 104 + 32 of them (26.6%, under the 28% of
Qwen3-8B -> DeepSeek's 512 + 64 against 4096) and GateSWA's window of 512 keys is an eighth of
the training context.

Everything else (steps, batches, learning rates, targets) is in the recipes
launch/recipes/study_{teacher,mla,gateswa}.yaml; ``--tiny`` overrides sizes with ``--set``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Dict, List, Optional

import yaml

from megatron_attnedit.config import RECIPES_DIR

TEACHER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
               intermediate_size=2048, max_position_embeddings=4096, rope_theta=10000.0)
TINY_TEACHER = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=256, max_position_embeddings=512, rope_theta=10000.0)
RECIPES = {"teacher": "study_teacher", "mla": "study_mla", "gateswa": "study_gateswa"}
STUDENTS = ("mla", "gateswa", "mla_no_stage1")
"""The three conversions: name -> (recipe, with stage 1)."""
CHAINS = {"mla": ("mla", True), "gateswa": ("gateswa", True), "mla_no_stage1": ("mla", False)}

# Planning figures for one H100 (80 GB HBM3), megatron-core 0.16.1 local spec, bf16. The README's
# Performance section measured 505 TFLOP/s for the CE step at Qwen3-8B shape (hidden 4096); at
# hidden 768 the GEMMs are 30x smaller and elementwise work weighs more, so 300 is assumed.
GPU_ASSUMED = dict(lm_tflops=280.0, stage1_cost=0.6, stage2_cost=1.05, process_start_s=28.0, save_s=17.0,
                   export_s=22.0, eval_start_s=25.0, eval_per_model_s=10.0, data_mb_per_s_16_workers=3.4)
"""stage1_cost / stage2_cost: step time per token relative to the teacher's lm step (README: stage 1
0.52x and stage 2 1.03x the CE step at 8B shape; 0.6 for stage 1 here, where attention is a larger
share of each layer). process_start_s: python + torch + megatron imports, building, the first
compiled kernels. The figures are the slower of two H100 runs (launch/results/scale_study_h100 and
scale_study_h100_drills_unfinished): the teacher at 415K and 384K tokens/s (280 TFLOP/s: 401K);
start-up 16-23 s and 21-33 s per process (three chains starting at once share 16 CPU cores); save
and exit 12-14 s and 16-18 s; export 13-17 s and 20-24 s; the data phase 320 MB in 78 s and 230 MB
in 82 s (each split's tokenizer pool spends ~18 s starting: ~3.4 MB/s over the phase). With the
first run's figures the plan said 462 s where that run took 506, and the second run overran its
guard: planning on the slower figures keeps the study inside its budget on either machine."""


RECALL_SHARE = 0.5
"""Half the training files carry recall drills (data/recall.py): the H100 run without them trained a
teacher whose exact recall in the probe was 0 at every distance (launch/results/scale_study_h100),
so there was nothing for the students to keep. Half, not all: the other half is the code as written."""


@dataclasses.dataclass
class Sizes:
    """What the study runs at: the recipes' values, or the tiny overrides."""

    profile: str  # gpu | tiny
    arch: Dict[str, float]
    corpus_max_bytes: Optional[int]
    valid_fraction: float
    seq: int
    teacher_sets: List[str]
    student_sets: List[str]  # every conversion run
    target_sets: Dict[str, List[str]]  # mla / gateswa runs
    stage_sets: Dict[str, List[str]]  # stage1 / stage2 extra overrides
    eval_max_tokens: int
    eval_batch: int
    decode_tokens: int
    probe_args: List[str]  # retrieval probe options of evaluate (empty: its defaults)
    jobs: int  # conversions run at once
    recall_share: float = RECALL_SHARE  # training files carrying recall drills (data/recall.py)

    @property
    def window(self) -> int:
        """GateSWA's window: the last ``target.options.window`` override of its runs, else its recipe's
        (the window the summary measures "beyond W" against is the student's)."""
        w = recipe("gateswa")["target"]["options"]["window"]
        for kv in self.student_sets + self.target_sets["gateswa"]:
            key, _, value = kv.partition("=")
            if key == "target.options.window":
                w = value
        return int(w)


def gpu_sizes(jobs: int = 3) -> Sizes:
    r = recipe("mla")
    return Sizes("gpu", dict(TEACHER), corpus_max_bytes=180_000_000, valid_fraction=0.02, seq=int(r["data"]["seq_length"]),
                 teacher_sets=[], student_sets=[],
                 target_sets={"mla": [], "gateswa": []}, stage_sets={"stage1": [], "stage2": []}, eval_max_tokens=131072, eval_batch=4, decode_tokens=64, probe_args=["--probe-trials", "16"], jobs=jobs)


def tiny_sizes(jobs: int = 1) -> Sizes:
    """A few minutes on 2 CPU cores: every phase, toy sizes. GateSWA's window is 32 of 256-token
    sequences (the study's W / seq = 1/8); MLA keeps 24 + 8 of the tiny teacher's 128 KV values per
    layer (25%)."""
    seq = 256
    data = [f"data.seq_length={seq}", "data.micro_batch_size=4"]
    return Sizes(
        "tiny", dict(TINY_TEACHER), corpus_max_bytes=3_000_000, valid_fraction=0.1, seq=seq,
        teacher_sets=data + ["data.global_batch_size=8", "training.train_iters=32", "optimizer.lr_warmup_iters=4",
                             "training.log_interval=4", "training.eval_interval=16", "training.eval_iters=1"],
        student_sets=data + ["data.global_batch_size=4"],
        target_sets={"mla": ["target.options.kv_lora_rank=24", "target.options.qk_pos_emb_head_dim=8", "target.options.calibration_tokens=1024"],
                     "gateswa": ["target.options.window=32"]},
        stage_sets={"stage1": ["training.train_iters=8", "optimizer.lr_warmup_iters=2"],
                    "stage2": ["training.train_iters=8", "optimizer.lr_warmup_iters=2"]},
        eval_max_tokens=4096, eval_batch=4, decode_tokens=16, probe_args=["--probe-trials", "2", "--probe-distances", "24,96"], jobs=jobs)


def recipe(name: str) -> dict:
    with open(os.path.join(RECIPES_DIR, RECIPES[name] + ".yaml")) as f:
        return yaml.safe_load(f)


def param_count(arch: dict, vocab: int = 4096) -> int:
    h, L, hd = arch["hidden_size"], arch["num_hidden_layers"], arch["head_dim"]
    q, kv = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd
    attn = h * q + 2 * h * kv + q * h + 2 * hd  # q, k, v, o, q/k norms
    mlp = 3 * h * arch["intermediate_size"]
    return L * (attn + mlp + 2 * h) + 2 * vocab * h + h  # + layer norms, untied embeddings, final norm


def flops_per_token(arch: dict, seq: int, vocab: int = 4096) -> float:
    """Training FLOPs per token (Megatron-LM's convention): 6 x matmul parameters (embedding lookup
    excluded, LM head included) + causal attention scores and values fwd+bwd (6 x seq x q width per layer)."""
    n = param_count(arch, vocab) - vocab * arch["hidden_size"]
    attn = 6 * seq * arch["num_attention_heads"] * arch["head_dim"] * arch["num_hidden_layers"]
    return 6 * n + attn


def kv_fractions(arch: dict, mla: dict, gswa: dict, context: int) -> Dict[str, float]:
    """KV-cache bytes of each student over the teacher's at ``context`` tokens (the targets' formulas)."""
    per_layer = 2 * arch["num_key_value_heads"] * arch["head_dim"]
    L = arch["num_hidden_layers"]
    m = (mla["kv_lora_rank"] + (mla.get("qk_pos_emb_head_dim") or arch["head_dim"] // 2)) / per_layer
    pattern = gswa["pattern"]
    kinds = [pattern[i % len(pattern)] for i in range(L)] if isinstance(pattern, str) else list(pattern)
    share = min(gswa["window"], context) / context
    g = sum(share if k == "S" else 1.0 for k in kinds) / L
    return {"mla": m, "gateswa": g, "mla_no_stage1": m}


def steps(sizes: Sizes) -> Dict[str, dict]:
    """Steps, global batch and tokens of each training run, from the recipes and the overrides."""
    def merged(base: dict, overlay: dict, sets: List[str]) -> dict:
        out = {"steps": int((overlay.get("training") or {}).get("train_iters", base["training"].get("train_iters", 0))),
               "gbs": int((overlay.get("data") or {}).get("global_batch_size", base["data"]["global_batch_size"]))}
        for s in sets:
            k, v = s.split("=", 1)
            if k == "training.train_iters":
                out["steps"] = int(v)
            elif k == "data.global_batch_size":
                out["gbs"] = int(v)
        out["tokens"] = out["steps"] * out["gbs"] * sizes.seq
        return out

    t = recipe("teacher")
    plan = {"teacher": merged(t, {}, sizes.teacher_sets)}
    for target in ("mla", "gateswa"):
        r = recipe(target)
        for stage in ("stage1", "stage2"):
            plan[f"{target}_{stage}"] = merged(r, r["stages"][stage], sizes.student_sets + sizes.target_sets[target] + sizes.stage_sets[stage])
    return plan


def estimate(sizes: Sizes, corpus_bytes: Optional[float] = None, workers: int = 16, lm_tokens_per_s: Optional[float] = None) -> Dict[str, float]:
    """Wall seconds per phase on one H100 from the planning figures (``GPU_ASSUMED``), or from a
    measured teacher throughput when given. The conversions run ``sizes.jobs`` at a time on the one
    GPU: their GPU work adds up, their start-ups overlap."""
    a = GPU_ASSUMED
    tps = lm_tokens_per_s or a["lm_tflops"] * 1e12 / flops_per_token(sizes.arch, sizes.seq)
    st = steps(sizes)
    nbytes = corpus_bytes if corpus_bytes is not None else (sizes.corpus_max_bytes or 3e8)
    # + 15 s: two pools of tokenizer processes starting (each imports transformers), the datasets' index
    out = {"data": nbytes / 1e6 / (a["data_mb_per_s_16_workers"] * workers / 16) + 15.0,
           "teacher": a["process_start_s"] + st["teacher"]["tokens"] / tps + a["save_s"] + a["export_s"]}
    gpu = sum(st[f"{t}_stage1"]["tokens"] * a["stage1_cost"] for t in ("mla", "gateswa")) / tps
    gpu += (2 * st["mla_stage2"]["tokens"] + st["gateswa_stage2"]["tokens"]) * a["stage2_cost"] / tps  # MLA twice: the ablation
    starts = 2 * (a["process_start_s"] + a["save_s"]) + a["export_s"]  # the longest chain: stage 1, stage 2, export
    fixed = starts * math.ceil(len(CHAINS) / max(1, sizes.jobs))
    out["conversions"] = gpu + fixed
    out["evaluate"] = a["eval_start_s"] + a["eval_per_model_s"] * (1 + len(CHAINS))
    out["total"] = sum(out.values())
    out.update(lm_tokens_per_s=tps, conversions_gpu=gpu, conversions_fixed=fixed)
    return out


EXTRAS = ("total", "lm_tokens_per_s", "conversions_gpu", "conversions_fixed")
"""Keys of ``estimate`` that are not phases."""


def describe(sizes: Sizes) -> str:
    n = param_count(sizes.arch)
    a = sizes.arch
    return (f"teacher: Qwen3 {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, {a['num_attention_heads']} heads x {a['head_dim']}, "
            f"{a['num_key_value_heads']} KV heads, SwiGLU {a['intermediate_size']}, {n / 1e6:.1f}M parameters, "
            f"{flops_per_token(a, sizes.seq) / 1e6:.0f} MFLOP/token at seq {sizes.seq}")
