#!/usr/bin/env python3
"""Routed-expert benchmark: megatron's SequentialMLP against our grouped-GEMM experts
(megatron_attnedit/models/experts.py), forward + backward, on one GPU. Prints one JSON object on
stdout (progress on stderr).

  python launch/bench_experts.py                     # Qwen3-30B-A3B experts, micro 1 and 2, bf16
  python launch/bench_experts.py --micro 1 2 4 --iters 30
  python launch/bench_experts.py --device cpu --tiny # smoke run of the same code on the CPU

Shape: the Qwen3-30B-A3B MoE layer (128 experts, hidden 2048, expert FFN 768, SwiGLU, top-8), one
layer's experts on one rank (EP=1): ``seq x micro`` tokens each routed to 8 distinct experts drawn
uniformly at random (so 8 x seq x micro expert rows), inputs as the allgather / alltoall dispatchers
hand them over (rows sorted by expert, ``tokens_per_expert`` on the CPU, fp32 router probabilities).
Both modules are built through the project's spec (``models.qwen3.mlp_spec``) and hold the same
weights. Reported per micro-batch size and implementation: median ms of forward + backward
(gradients of the weights, the input and the probabilities), TFLOP/s, peak memory; the speedup; and
the largest difference of the outputs and of the input / fc1-weight gradients relative to their
largest magnitude (bf16: expect ~1e-2 at most).

FLOPs (matmuls only): forward 2 * rows * hidden * (2 * ffn) for fc1 plus 2 * rows * ffn * hidden
for fc2 = 6 * rows * hidden * ffn; backward twice that; 18 * rows * hidden * ffn in all.
Needs megatron-core (on a machine without it: pip install --no-deps <megatron_core wheel>).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "qwen3-30b-a3b": dict(experts=128, hidden=2048, ffn=768, topk=8, seq=4096),
    "tiny": dict(experts=8, hidden=64, ffn=32, topk=2, seq=64),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_pair(shape: dict, dtype: torch.dtype, on_gpu: bool):
    """(SequentialMLP, GroupedExperts) of ``shape`` with equal weights, on the current device."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_attnedit.models import builder
    from megatron_attnedit import families

    cfg = families.config_for_preset("qwen3-30b-a3b")
    cfg.update(num_hidden_layers=1, mlp_only_layers=[], num_experts=shape["experts"], hidden_size=shape["hidden"],
               moe_intermediate_size=shape["ffn"], num_experts_per_tok=shape["topk"])
    mods = []
    for grouped in (False, True):
        opts = builder.BuildOptions(params_dtype=dtype, bf16=dtype == torch.bfloat16, grouped_gemm=grouped,
                                  use_cpu_initialization=not on_gpu)
        config = builder.transformer_config(cfg, opts)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        spec = builder.mlp_spec(opts, moe=True).submodules.experts
        mods.append(build_module(spec, shape["experts"], config, pg_collection=get_default_pg_collection()))
    seq, grp = mods
    with torch.no_grad():  # equal weights whatever the initialisation path did
        for i, e in enumerate(seq.local_experts):
            grp.fc1_weight[i].copy_(e.linear_fc1.weight)
            grp.fc2_weight[i].copy_(e.linear_fc2.weight)
    return seq, grp


def routed_inputs(shape: dict, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Dispatched expert inputs for uniform random top-k routing of ``tokens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(tokens, shape["experts"], generator=g).topk(shape["topk"], dim=-1).indices
    tokens_per_expert = torch.bincount(chosen.flatten(), minlength=shape["experts"])  # on the CPU, as the dispatchers pass it
    rows = int(tokens_per_expert.sum())
    x = torch.randn(rows, shape["hidden"], generator=g).to(device=device, dtype=dtype)
    probs = torch.rand(rows, generator=g).to(device)  # fp32, the router's dtype
    grad = torch.randn(rows, shape["hidden"], generator=g).to(device=device, dtype=dtype)
    return x, tokens_per_expert, probs, grad


def step(mod, x, tokens_per_expert, probs, grad):
    x = x.detach().requires_grad_()
    probs = probs.detach().requires_grad_()
    out, _ = mod(x, tokens_per_expert, probs)
    out.backward(grad)
    return out, x.grad, probs.grad


def timed(mod, inputs, iters: int, warmup: int, on_gpu: bool) -> dict:
    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(warmup):
        mod.zero_grad(set_to_none=True)
        step(mod, *inputs)
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        mod.zero_grad(set_to_none=True)
        if on_gpu:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(mod, *inputs)
            b.record()
            sync()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step(mod, *inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3)}
    if on_gpu:
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.float().abs().max().item() or 1.0
    return (a.float() - b.float()).abs().max().item() / scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy shape (smoke test, e.g. with --device cpu)")
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2], help="micro-batch sizes; tokens = seq x micro")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096; tiny: 64)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()

    from megatron_attnedit import platform

    on_gpu = a.device == "cuda"
    plat = platform.init_platform(a.device)
    platform.init_distributed(plat)
    shape = dict(SHAPES["tiny" if a.tiny else "qwen3-30b-a3b"])
    if a.seq:
        shape["seq"] = a.seq
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if on_gpu else "fp32")]
    if a.tiny:
        a.iters, a.warmup = min(a.iters, 3), min(a.warmup, 1)
    device = plat.device

    seq_mod, grp_mod = build_pair(shape, dtype, on_gpu)
    variants = {"sequential_mlp": (seq_mod, None), "grouped": (grp_mod, "auto")}
    if not on_gpu:
        variants["grouped_mm_forced"] = (grp_mod, "grouped_mm")  # exercises the GPU path's code on the CPU
    result = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "runs": [],
    }
    for micro in a.micro:
        tokens = shape["seq"] * micro
        inputs = routed_inputs(shape, tokens, dtype, device)
        rows = inputs[0].shape[0]
        flops = 18 * rows * shape["hidden"] * shape["ffn"]
        run = {"micro": micro, "tokens": tokens, "rows": rows, "empty_experts": int((inputs[1] == 0).sum())}
        outs = {}
        for name, (mod, impl) in variants.items():
            if impl:
                mod.impl = impl
            log(f"[bench_experts] micro {micro}: {name}")
            t = timed(mod, inputs, a.iters, a.warmup, on_gpu)
            t["tflops"] = round(flops / (t["ms"] * 1e-3) / 1e12, 2)
            if impl:
                t["path"] = "grouped_mm" if mod.uses_grouped_mm(inputs[0]) else "loop"
            run[name] = t
            mod.zero_grad(set_to_none=True)
            o, gx, _ = step(mod, *inputs)
            gw = seq_mod.local_experts[0].linear_fc1.weight.grad if mod is seq_mod else mod.fc1_weight.grad[0]
            outs[name] = (o.detach(), gx, gw.clone())
        run["speedup"] = round(run["sequential_mlp"]["ms"] / run["grouped"]["ms"], 2)
        ref_out, ref_gx, ref_gw = outs["sequential_mlp"]
        run["max_rel_diff_vs_sequential"] = {
            name: {"output": rel_diff(o, ref_out), "input_grad": rel_diff(gx, ref_gx), "fc1_weight_grad_expert0": rel_diff(gw, ref_gw)}
            for name, (o, gx, gw) in outs.items() if name != "sequential_mlp"
        }
        result["runs"].append(run)
        del inputs, outs
        if on_gpu:
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
