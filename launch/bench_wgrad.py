#!/usr/bin/env python3
"""Weight-gradient accumulation into fp32 main grads: the two-kernel path megatron takes without
apex (bf16 wgrad GEMM, then main_grad.add_) against one GEMM that accumulates into the fp32 buffer
(``torch.addmm(main_grad, dy^T, x, out_dtype=float32, out=main_grad)``, torch >= 2.9 on CUDA).
Prints one JSON object: ms per accumulation at Qwen3-8B / 30B-A3B linear shapes, and the error of
each path against an fp32 reference.

  python launch/bench_wgrad.py [--tokens 4096] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = {  # name: (out_features, in_features)
    "8b_qkv": (6144, 4096),
    "8b_fc1": (24576, 4096),
    "8b_fc2": (4096, 12288),
    "8b_output": (151936, 4096),
    "30b_output": (151936, 2048),
}


def timed(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": a.tokens, "shapes": {}}
    for name, (o, i) in SHAPES.items():
        x = torch.randn(a.tokens, i, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(a.tokens, o, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(o, i, device="cuda")
        ref = g.double() + dy.double().t() @ x.double()
        row = {}
        m = g.clone()
        m.add_(dy.t() @ x)
        row["err_two_kernels"] = (m.double() - ref).abs().max().item()
        row["ms_two_kernels"] = timed(lambda: m.add_(dy.t() @ x), a.iters)
        try:
            m = g.clone()
            torch.addmm(m, dy.t(), x, out_dtype=torch.float32, out=m)
            row["err_fused"] = (m.double() - ref).abs().max().item()
            row["ms_fused"] = timed(lambda: torch.addmm(m, dy.t(), x, out_dtype=torch.float32, out=m), a.iters)
            row["speedup"] = row["ms_two_kernels"] / row["ms_fused"]
        except (RuntimeError, TypeError) as e:
            row["fused"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
        res["shapes"][name] = row
        del x, dy, g, ref, m
        torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
