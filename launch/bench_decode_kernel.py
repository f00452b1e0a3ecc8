"""Decode attention alone, one layer, on one GPU: the engine's two kernels side by side. JSON lines.

    python launch/bench_decode_kernel.py --out launch/results/bench_decode_kernel_h100.json

For each case (Qwen3-8B shapes: the teacher's GQA, 8 key heads of 128 for 32 query heads; MLA's
latent, one key head of 512 + 64 columns whose first 512 are the values, for 32 query heads; a
GateSWA sliding layer, a ring of 4096 slots with sinks) at a context and batch, both kernels of
attention/decode_kernels.cached_attention -- ``matmul`` (scores materialised, values read in a second
pass) and ``triton`` (attention/decode_triton.py, one pass) -- are timed with CUDA events over
repeated calls, and their output compared with an fp32 computation of the same inputs.
``cache_GBps``: bytes the cache holds for the valid positions / time (what a kernel that reads the
cache once and nothing else would need to move), so it can be read against the GPU's memory
bandwidth (H100 SXM: 3.35 TB/s peak). Random bf16 inputs; the batch sizes are bench_decode's
largest batches at 36 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_attnedit.attention.decode_kernels import cached_attention  # noqa: E402

# name, batch, key heads, group, qk dim, v dim, slots, mla (values = the keys' first columns), sinks
CASES = [
    ("teacher_gqa_32k_b1", 1, 8, 4, 128, 128, 32768, False, False),
    ("teacher_gqa_32k_b12", 12, 8, 4, 128, 128, 32768, False, False),
    ("mla_32k_b1", 1, 1, 32, 576, 512, 32768, True, False),
    ("mla_32k_b46", 46, 1, 32, 576, 512, 32768, True, False),
    ("gateswa_sliding_w4096_b48", 48, 8, 4, 128, 128, 4096, False, True),
    ("teacher_gqa_128k_b3", 3, 8, 4, 128, 128, 131072, False, False),
    ("mla_128k_b10", 10, 1, 32, 576, 512, 131072, True, False),
]


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python launch/bench_decode_kernel.py", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    dev = torch.device("cuda")
    rows = []
    for name, b, kvh, g, d, dv, n, mla, sinks in CASES:
        torch.manual_seed(0)
        q = torch.randn(b, kvh, g, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, kvh, n, d, device=dev, dtype=torch.bfloat16)
        v = k[..., :dv] if mla else torch.randn(b, kvh, n, dv, device=dev, dtype=torch.bfloat16)
        s = torch.randn(kvh * g, device=dev) if sinks else None
        pos = torch.tensor([n - 1], device=dev)
        scale = d ** -0.5
        ref, _ = cached_attention(q.float(), k.float(), v.float(), pos, scale, s, "matmul")
        cache_bytes = k.numel() * 2 + (0 if mla else v.numel() * 2)
        row = dict(case=name, batch=b, key_heads=kvh, group=g, qk_dim=d, v_dim=dv, slots=n, cache_GB=cache_bytes / 1e9)
        for kernel in ("matmul", "triton"):
            try:
                out, used = cached_attention(q, k, v, pos, scale, s, kernel)
                ms = timed(lambda: cached_attention(q, k, v, pos, scale, s, kernel), a.reps)
                row[kernel] = dict(ms=ms, cache_GBps=cache_bytes / 1e9 / (ms / 1e3), kernel=used,
                                   max_rel_err_vs_fp32=float((out.float() - ref).abs().max() / ref.abs().max()))
            except (RuntimeError, torch.OutOfMemoryError) as e:
                row[kernel] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            torch.cuda.empty_cache()
        if "ms" in row["matmul"] and "ms" in row["triton"]:
            row["speedup"] = row["matmul"]["ms"] / row["triton"]["ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, ref
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out + ".tmp", "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__,
                           command="python launch/bench_decode_kernel.py " + " ".join(sys.argv[1:] if argv is None else argv), rows=rows),
                      fh, indent=1)
        os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
