"""FusedMLASelfAttention at TP=2 against megatron's MLASelfAttention, on 2 gloo processes.

For each case (query latent off / on, sequence parallelism off / on) an MLA student is built twice
from the same seed, with and without ``kernel_fusion`` (the fused functions compiled for the CPU
by inductor, as for CUDA), and one forward + backward runs on the same tokens. Each rank writes
{case: {"logits": max |diff| of its vocabulary shard, "grads": max relative |diff| over its
parameter shards, "n_grads": how many, "fused": whether mla_qkv ran compiled}} to
--out-dir/rank<R>.json.
"""

import argparse
import json
import os
import sys

import torch

CASES = {  # (query latent rank, sequence parallel)
    "q_full": (None, False),
    "q_lora": (24, False),
    "q_full_sp": (None, True),
    "q_lora_sp": (24, True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()

    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    platform.init_distributed(plat, 2, 1)
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.kernels import fusions
    from megatron_attnedit.models import builder
    from megatron_attnedit import families
    from megatron_attnedit.targets.student import build_student

    fusions.DEVICES = {"cpu", "cuda"}
    ran = set()
    compiled = fusions.compiled

    def spy(fn):
        ran.add(fn.__name__)
        return compiled(fn)

    fusions.compiled = spy
    cfg = families.config_for_preset("qwen3-debug")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    results = {}
    for name, (q_lora_rank, sp) in CASES.items():
        options = {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8, "init": "random", "q_lora_rank": q_lora_rank}
        runs = []
        for fusion in (False, True):
            ran.clear()
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            torch.manual_seed(1234)
            opts = builder.BuildOptions(tensor_model_parallel_size=2, sequence_parallel=sp, kernel_fusion=fusion)
            model = build_student(cfg, TargetConfig("mla", options), opts)
            logits = model(tokens, pos, None)
            logits.float().square().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            runs.append((logits.detach(), grads, "mla_qkv" in ran))
        (ref, ref_grads, _), (got, grads, fused) = runs
        rel = [((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1.0)).item() for n in ref_grads]
        results[name] = {
            "logits": (got - ref).abs().max().item(),
            "grads": max(rel) if grads.keys() == ref_grads.keys() else float("inf"),
            "n_grads": len(ref_grads),
            "fused": fused,
        }
    with open(os.path.join(a.out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
