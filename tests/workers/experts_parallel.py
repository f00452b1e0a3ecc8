"""Grouped-GEMM experts vs SequentialMLP on 2 gloo processes (tests/test_experts.py), one torchrun for
all of it. For each layout (TP1/EP2; TP2 with expert TP 2; TP1/EP1, i.e. expert DP 2 for the replica ids):

* logits of the grouped model loaded from HF (both compute paths: ``loop`` and ``grouped_mm``),
  written by rank 0 for the test to compare with transformers;
* the two models' distributed-checkpoint entries, after megatron's factories are applied: every
  ShardedTensor / ShardedObject (key, global shape, offsets, fragmentation, replica id, dtype, data);
* torch_dist checkpoints across implementations: SequentialMLP saves, a differently seeded grouped
  model loads it (and the reverse), then every module-state tensor is compared with the saver's;
  at TP2 the checkpoint written at TP1/EP2 is loaded too (resharding EP2 -> expert TP2);
* the replica ids of the expert weights (TP, DP parts), which only DP2 makes non-zero.

Rank 0 writes a JSON of findings to --result (lists of mismatches, which the test wants empty).
"""

import argparse
import json
import os
import sys

import torch


def entries(model):
    """Every checkpoint entry of ``model`` as (metadata tuple, data), sorted by metadata."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    out = []
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            meta = ("T", v.key, tuple(v.global_shape), tuple(v.global_offset), tuple(v.local_shape), tuple(v.axis_fragmentations),
                    tuple(v.replica_id), v.prepend_axis_num, str(v.dtype))
            out.append((meta, v.data.detach().clone()))
        elif isinstance(v, ShardedObject):
            out.append((("O", v.key, tuple(v.global_shape), tuple(v.global_offset), tuple(v.replica_id)), v.data))
        else:
            raise TypeError(type(v))
    return sorted(out, key=lambda e: repr(e[0]))


def compare_entries(a, b):
    problems = []
    ma, mb = [m for m, _ in a], [m for m, _ in b]
    if ma != mb:
        problems.append(f"metadata differs: only sequential {sorted(set(ma) - set(mb))[:3]}, only grouped {sorted(set(mb) - set(ma))[:3]}")
        return problems
    for (m, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor) and not torch.equal(x, y):
            problems.append(f"data differs for {m}")
    return problems


def state_mismatches(got, ref):
    """Keys of the module state dicts that differ (key sets, then tensor values)."""
    g, r = got.state_dict(), ref.state_dict()
    if list(g) != list(r):
        return [f"state keys differ: {sorted(set(g) ^ set(r))[:5]}"]
    return [k for k, v in g.items() if isinstance(v, torch.Tensor) and not torch.equal(v, r[k])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()

    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.convert.checkpoint import conversion_metadata, load_mcore_checkpoint_into_model, save_mcore_checkpoint
    from megatron_attnedit.families.table import ModelTable
    from megatron_attnedit.models import builder, forward
    from megatron_attnedit import families
    from megatron_attnedit.families import table

    cfg = families.load_hf_config(a.hf_dir)
    tokens = torch.load(a.tokens)
    result = {}
    first_ckpt = None
    for tp, ep in ((1, 2), (2, 1), (1, 1)):
        platform.init_distributed(plat, tp, 1, ep)
        name = f"tp{tp}_ep{ep}"

        def build(grouped, seed=1234, from_hf=True):
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            torch.manual_seed(seed)
            opts = builder.BuildOptions(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, grouped_gemm=grouped)
            model = builder.build_model(cfg, opts)
            if from_hf:
                hf_io.load_into_model(model, hf_io.HFCheckpoint(a.hf_dir), ModelTable(cfg, tp=tp))
            return model.eval()

        seq, grp = build(False), build(True)
        r = {"state_vs_sequential": state_mismatches(grp, seq)}
        for impl in ("loop", "grouped_mm"):
            for layer in grp.decoder.layers:
                if hasattr(layer.mlp, "experts"):
                    layer.mlp.experts.impl = impl
            logits = forward.forward_logits(grp, tokens, cfg["vocab_size"])
            if logits is not None and dist.get_rank() == 0:
                torch.save(logits.float(), os.path.join(a.work, f"logits_{name}_{impl}.pt"))
        grp_entries = entries(grp)
        r["sharded_entries"] = compare_entries(entries(seq), grp_entries)
        r["expert_entries"] = sum(1 for m, _ in grp_entries if ".experts.experts." in m[1])
        # (TP, DP) parts of the expert weights' replica ids: one value per rank (a tuple, kept per rank)
        rep = {m[6][1:] for m, _ in grp_entries if m[0] == "T" and ".experts.experts." in m[1]}
        r["replica_ids"] = tuple(rep.pop()) if len(rep) == 1 else ("several",)

        # what the converter and the training loop record (the loader refuses metadata without it)
        meta = conversion_metadata(cfg, tp, 1, ep, table.padded_vocab_size(cfg["vocab_size"], tp), "torch_dist", torch.float32)
        seq_dir, grp_dir = os.path.join(a.work, f"seq_{name}"), os.path.join(a.work, f"grp_{name}")
        save_mcore_checkpoint(seq, seq_dir, meta)
        save_mcore_checkpoint(grp, grp_dir, meta)
        fresh = build(True, seed=99, from_hf=False)
        r["fresh_differs_before_load"] = bool(state_mismatches(fresh, seq))
        load_mcore_checkpoint_into_model(fresh, seq_dir)
        r["grouped_from_sequential_ckpt"] = state_mismatches(fresh, seq)
        fresh = build(False, seed=99, from_hf=False)
        load_mcore_checkpoint_into_model(fresh, grp_dir)
        r["sequential_from_grouped_ckpt"] = state_mismatches(fresh, grp)
        if tp == 2:  # the SequentialMLP checkpoint written at TP1/EP2, resharded
            fresh = build(True, seed=99, from_hf=False)
            load_mcore_checkpoint_into_model(fresh, first_ckpt)
            r["grouped_from_other_layout_ckpt"] = state_mismatches(fresh, seq)
        first_ckpt = first_ckpt or seq_dir

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, r)
        merged = {}
        for k in gathered[0]:
            vals = [g[k] for g in gathered]
            merged[k] = sorted({x for v in vals for x in v}) if isinstance(vals[0], list) else vals
        result[name] = merged
        del seq, grp, fresh

    if dist.get_rank() == 0:
        with open(a.result, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
