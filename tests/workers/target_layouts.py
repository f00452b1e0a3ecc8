"""Hybrid students at TP=1, TP=2 and PP=2 on 2 processes: the same logits everywhere.

One torchrun call runs every layout in turn (megatron's parallel state is rebuilt between them):
* TP=1 (data-parallel 2): each student is initialised from the teacher; its logits are the
  reference. Then its gate/sink parameters are perturbed (so nothing is trivially "open"), it is
  saved through the student's conversion table, and the perturbed logits are a second reference.
* TP=2 (with and without sequence parallelism) and PP=2: (a) the student initialised from the teacher sharded that way, (b) the saved
  student loaded through the table; each rank holding logits compares them with TP=1's.
Each rank writes {case: max |difference|} to --out-dir/rank<R>.json.
"""

import argparse
import json
import os
import sys

import torch

STUDENTS = {
    # MLA and GQA layers mixed (M G M G), query latent on, latent split over TP.
    "mla": {"name": "mla", "options": {"pattern": "MG", "kv_lora_rank": 32, "qk_pos_emb_head_dim": 8, "q_lora_rank": 32}},
    # sliding and full layers mixed (S F S F), window 8 < 24 tokens, sinks on.
    "gate_swa": {"name": "gate_swa", "options": {"pattern": "SF", "window": 8, "sinks": True}},
}
LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)]  # (TP, PP, sequence parallel)


@torch.no_grad()
def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "linear_gate" in name or "softmax_offset" in name or "kv_layernorm" in name:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def save_hf(model, table, out_dir, cfg):
    from safetensors.torch import save_file

    from megatron_attnedit.families import mapping
    from megatron_attnedit.convert.hf_io import trainable_items

    tensors = {}
    for name, v in trainable_items(model):
        rule, layer, expert = table.rule_for(name)
        _, hf_names = rule.format(layer, expert)
        for h, t in zip(hf_names, mapping.to_hf(rule, v.detach(), table.shapes)):
            tensors[h] = t.contiguous().clone()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()

    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.families.table import ModelTable
    from megatron_attnedit.models import builder, forward
    from megatron_attnedit import families
    from megatron_attnedit.targets.student import build_student, init_student_from_teacher, student_table

    cfg = families.load_hf_config(a.hf_dir)
    tokens = torch.load(a.tokens)
    vocab = cfg["vocab_size"]
    ref, results = {}, {}
    for tp, pp, sp in LAYOUTS:
        platform.init_distributed(plat, tp, pp)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        rank = dist.get_rank()
        opts = builder.BuildOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
        where = f"tp{tp} pp{pp}" + (" sp" if sp else "")
        teacher = builder.build_model(cfg, opts)
        hf_io.load_into_model(teacher, hf_io.HFCheckpoint(a.hf_dir), ModelTable(cfg, tp=tp))
        teacher_logits = forward.forward_logits(teacher, tokens, vocab)
        for key, spec in STUDENTS.items():
            tc = TargetConfig.from_dict(spec)
            student = build_student(cfg, tc, opts)
            init_student_from_teacher(student, teacher, cfg, tc)
            init_logits = forward.forward_logits(student, tokens, vocab)
            ckpt = os.path.join(a.work, key)
            if (tp, pp, sp) == (1, 1, False):
                perturb(student, seed=11)
                if rank == 0:
                    save_hf(student, student_table(cfg, tc), ckpt, cfg)
                dist.barrier()
                ref[key] = (init_logits, forward.forward_logits(student, tokens, vocab))
                results[f"{key} tp1 student vs teacher"] = (init_logits - teacher_logits).abs().max().item()
                results[f"{key} tp1 perturbed vs init"] = (ref[key][1] - init_logits).abs().max().item()
                continue
            loaded = build_student(cfg, tc, opts)
            hf_io.load_into_model(loaded, hf_io.HFCheckpoint(ckpt), student_table(cfg, tc, tp=tp))
            loaded_logits = forward.forward_logits(loaded, tokens, vocab)
            if init_logits is not None:
                results[f"{key} {where} init"] = (init_logits - ref[key][0]).abs().max().item()
                results[f"{key} {where} loaded"] = (loaded_logits - ref[key][1]).abs().max().item()
        dist.barrier()
    with open(os.path.join(a.work, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
