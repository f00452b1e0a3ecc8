"""Vocabulary-sized losses on one GPU at Qwen3 size: time and peak memory of forward + backward.

    python launch/bench_losses.py                  # V = 151,936, 4096 tokens, bf16 logits
    python launch/bench_losses.py --tokens 8192 --chunks 0,256,1024,auto

One JSON line per case: KL(teacher || student) and CE of ``distill.losses`` at each chunk size
(``0`` = the whole micro-batch at once, ``auto`` = ``losses.CHUNK_BYTES``), and megatron's
``vocab_parallel_cross_entropy`` on fp32 logits, as the lm objective called it before. Logits are laid
out as GPTModel returns them ([b, s, V] view of a contiguous [s, b, V]). ``extra_peak_GiB`` is the
peak allocated during forward + backward above the inputs (logits, teacher logits, labels), with the
logits' gradient included -- it is the same size in every case (the logits' dtype).
Each case runs eagerly and with the inductor-fused passes (``losses.FUSED``). Also checks that every
chunk size and the fused passes give the eager whole-batch loss and gradient (bf16: to bf16 precision).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(fn, x, reps):
    """(ms per fwd+bwd, GiB above the inputs at the peak, loss, grad) of ``fn(x)``."""
    torch.cuda.synchronize()
    times = []
    for i in range(reps + 1):
        x.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(x)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        if i:  # the first call warms up
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], peak, loss.detach().float(), x.grad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunks", default="0,auto,1024")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_attnedit.training import losses

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (a.tokens, 1, a.vocab)
    s = (torch.randn(shape, device="cuda", generator=g) * 2).to(torch.bfloat16).transpose(0, 1)
    t = (torch.randn(shape, device="cuda", generator=g) * 2).to(torch.bfloat16).transpose(0, 1)
    labels = torch.randint(0, a.vocab, (1, a.tokens), device="cuda", generator=g)
    x = s.detach().clone().requires_grad_(True)
    device = torch.cuda.get_device_name()
    ref = {}
    for fused, chunk in [(f, c) for f in (False, True) for c in a.chunks.split(",")]:
        losses.FUSED = fused  # False: eager passes; True: inductor-fused passes (CUDA)
        c = None if chunk == "auto" else int(chunk)
        for name, fn in (("kl", lambda x: losses.kl_divergence(x, t, None, 1.0, a.vocab, group, chunk_tokens=c)),
                         ("ce", lambda x: losses.cross_entropy(x, labels, None, a.vocab, group, chunk_tokens=c))):
            ms, peak, loss, grad = measure(fn, x, a.reps)
            if name not in ref:
                ref[name] = (loss, grad.float())
            same = {"loss_rel_diff": abs(float(loss - ref[name][0])) / abs(float(ref[name][0])),
                    "grad_max_abs_diff": float((grad.float() - ref[name][1]).abs().max()), "grad_max_abs": float(ref[name][1].abs().max())}
            print(json.dumps({"device": device, "loss": name, "fused": fused, "chunk_tokens": chunk, "tokens_per_chunk": min(a.tokens, losses.chunk_size(a.vocab, c)),
                              "ms_fwd_bwd": round(ms, 3), "extra_peak_GiB": round(peak, 3), **same}), flush=True)

    def megatron_ce(x):
        per_token = tensor_parallel.vocab_parallel_cross_entropy(x.transpose(0, 1).float().contiguous(), labels.t().contiguous())
        return per_token.mean()

    ms, peak, loss, grad = measure(megatron_ce, x, a.reps)
    print(json.dumps({"device": device, "loss": "ce_megatron_fp32", "chunk_tokens": None, "ms_fwd_bwd": round(ms, 3), "extra_peak_GiB": round(peak, 3),
                      "loss_rel_diff": abs(float(loss - ref["ce"][0])) / abs(float(ref["ce"][0])),
                      "grad_max_abs_diff": float((grad.float() - ref["ce"][1]).abs().max())}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
