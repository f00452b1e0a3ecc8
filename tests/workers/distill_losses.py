"""Vocab-parallel distillation losses on 2 gloo processes: each rank holds half the vocabulary
(and, for the sequence-parallel case, half the tokens). Rank 0 writes losses and gathered grads."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatron_attnedit.training import losses  # noqa: E402


def case_tensors():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 256, generator=g) * 3
    t = torch.randn(2, 5, 256, generator=g) * 3
    labels = torch.randint(0, 200, (2, 5), generator=g)
    mask = (torch.rand(2, 5, generator=g) > 0.2).float()
    h_s = torch.randn(6, 2, 16, generator=g)
    h_t = torch.randn(6, 2, 16, generator=g)
    return s, t, labels, mask, h_s, h_t


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    s, t, labels, mask, h_s, h_t = case_tensors()
    V = s.shape[-1] // world
    out = {}
    t_sbh = t.transpose(0, 1).contiguous().transpose(0, 1)  # GPTModel's layout: chunks along s
    for name, fn in {
        "kl": lambda x: losses.kl_divergence(x, t[..., rank * V:(rank + 1) * V], mask, 2.0, 200, group),
        "topk": lambda x: losses.topk_kl_divergence(x, t[..., rank * V:(rank + 1) * V], 8, mask, 2.0, 200, group),
        "ce": lambda x: losses.cross_entropy(x, labels, mask, 200, group),
        # 4 tokens = 2 rows of s per chunk: chunks of 2, 2, 1 rows, each with its own all-reduces
        "kl@4": lambda x: losses.kl_divergence(x, t_sbh[..., rank * V:(rank + 1) * V], mask, 2.0, 200, group, chunk_tokens=4),
        "topk@4": lambda x: losses.topk_kl_divergence(x, t_sbh[..., rank * V:(rank + 1) * V], 8, mask, 2.0, 200, group, chunk_tokens=4),
        "ce@4": lambda x: losses.cross_entropy(x, labels, mask, 200, group, chunk_tokens=4),
        # real vocabulary 120 < 128: rank 1's shard is all padding
        "kl@4_v120": lambda x: losses.kl_divergence(x, t_sbh[..., rank * V:(rank + 1) * V], mask, 2.0, 120, group, chunk_tokens=4),
        "ce@4_v120": lambda x: losses.cross_entropy(x, labels.clamp(max=119), mask, 120, group, chunk_tokens=4),
    }.items():
        x = s[..., rank * V:(rank + 1) * V].clone()
        if "@" in name:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        x.requires_grad_(True)
        loss = fn(x)
        loss.backward()
        grads = [torch.empty_like(x.grad) for _ in range(world)]
        dist.all_gather(grads, x.grad.contiguous(), group=group)
        out[name] = (loss.detach(), torch.cat(grads, -1))
    # sequence parallel: tokens (dim 0) split over the group
    S = h_s.shape[0] // world
    for name, fn in {
        "nmse": lambda x: losses.normalized_mse(x, h_t[rank * S:(rank + 1) * S], sp_group=group),
        "cos": lambda x: losses.feature_cosine(x, h_t[rank * S:(rank + 1) * S], 0.05, sp_group=group),
    }.items():
        x = h_s[rank * S:(rank + 1) * S].clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        grads = [torch.empty_like(x.grad) for _ in range(world)]
        dist.all_gather(grads, x.grad.contiguous(), group=group)
        out[name] = (loss.detach(), torch.cat(grads, 0))
    if rank == 0:
        torch.save(out, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
