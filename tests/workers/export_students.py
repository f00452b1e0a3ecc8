"""Students saved as megatron checkpoints, exported to HF; plus bad copies of their metadata.

    python export_students.py WORK

For each case: a tiny teacher written by transformers, the megatron student built from it
(targets/student.py), its attention parameters perturbed (so that nothing is trivially equal to
the teacher or to an "open" gate), its logits on fixed tokens, then ``save_mcore_checkpoint`` with
the metadata the training checkpointer writes (target name + target_options) and ``mcore_to_hf``.
Then copies of some checkpoints with edited metadata (WORK/bad/<name>) go through the
``mcore_to_hf.py`` command line into WORK/out/<name>. Writes WORK/<case>/{teacher, ckpt, hf,
megatron_logits.pt}, WORK/tokens.pt and WORK/result.json {case: {"seconds", "stderr"}, "bad":
{name: {"rc", "stdout", "stderr"}}}. Single process, CPU.
"""

import contextlib
import io
import json
import os
import shutil
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

CASES = {
    # MLA, every layer; full-rank query
    "mla-dense": ("qwen3-debug", {}, {"name": "mla", "options": {"kv_lora_rank": 32, "qk_pos_emb_head_dim": 8}}),
    # query latent, uniform RoPE frequencies, tied embeddings
    "mla-dense-qlora-tied": ("qwen3-debug", {"tie_word_embeddings": True},
                             {"name": "mla", "options": {"kv_lora_rank": 24, "q_lora_rank": 32, "qk_pos_emb_head_dim": 8, "rope_frequencies": "uniform"}}),
    # MoE with a dense first layer; Qwen3-30B-A3B routing (softmax top-k renormalised)
    "mla-moe": ("qwen3-moe-debug", {}, {"name": "mla", "options": {"kv_lora_rank": 32, "qk_pos_emb_head_dim": 8}}),
    # MoE without renormalisation: what stock transformers' DeepseekV2 computes
    "mla-moe-nonorm": ("qwen3-moe-debug", {"norm_topk_prob": False}, {"name": "mla", "options": {"kv_lora_rank": 32, "qk_pos_emb_head_dim": 8}}),
    # window 8 < 24 tokens, per-head gate, sinks
    "gateswa-dense": ("qwen3-debug", {}, {"name": "gate_swa", "options": {"pattern": "SF", "window": 8, "sinks": True}}),
    # MoE, per-channel gate, no sinks (transformers' sdpa path), pattern S S F S
    "gateswa-moe": ("qwen3-moe-debug", {}, {"name": "gate_swa", "options": {"pattern": ["S", "S", "F", "S"], "window": 6, "gate": "channel"}}),
    # the plumbing target: the teacher's own format
    "gqa-dense": ("qwen3-debug", {}, {"name": "gqa", "options": {"init": "copy"}}),
    # Llama 3 teacher (no q/k-norm, llama3 RoPE scaling, tied embeddings): svd init without a norm to fold
    "mla-llama": ("llama3-debug", {}, {"name": "mla", "options": {"kv_lora_rank": 32, "qk_pos_emb_head_dim": 8}}),
    "gateswa-llama": ("llama3-debug", {"tie_word_embeddings": False}, {"name": "gate_swa", "options": {"pattern": "SSF", "window": 8, "sinks": True}}),
}


@torch.no_grad()
def perturb(student, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(student.named_parameters()):
        if ".self_attention." not in name:
            continue
        if name.endswith("softmax_offset"):
            p.copy_(torch.randn(p.shape, generator=g))  # sinks that matter (they start at -20)
        elif "linear_gate" in name:
            p.add_(0.5 * torch.randn(p.shape, generator=g))  # gates away from exactly open
        else:
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))


def make_case(work, name, preset, overrides, target_spec, tokens):
    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.convert.checkpoint import conversion_metadata, save_mcore_checkpoint
    from megatron_attnedit.convert.converters import mcore_to_hf
    from megatron_attnedit.families.table import ModelTable
    from megatron_attnedit.models import builder, forward
    from megatron_attnedit import families
    from megatron_attnedit.families import table
    from megatron_attnedit.targets.student import build_student, init_student_from_teacher
    from megatron_attnedit.testing import make_tiny_hf

    d = os.path.join(work, name)
    teacher_dir = os.path.join(d, "teacher")
    make_tiny_hf(teacher_dir, preset, seed=3, **overrides)
    cfg = families.load_hf_config(teacher_dir)
    opts = builder.BuildOptions()
    teacher = builder.build_model(cfg, opts)
    hf_io.load_into_model(teacher, hf_io.HFCheckpoint(teacher_dir), ModelTable(cfg))
    tc = TargetConfig.from_dict(target_spec)
    student = build_student(cfg, tc, opts)
    init_student_from_teacher(student, teacher, cfg, tc)
    perturb(student, seed=7)
    torch.save(forward.forward_logits(student, tokens, cfg["vocab_size"]).float(), os.path.join(d, "megatron_logits.pt"))
    # the metadata training/checkpoint.py writes: the target's name, and its options beside it
    meta = conversion_metadata(cfg, 1, 1, 1, table.padded_vocab_size(cfg["vocab_size"], 1), "torch_dist", torch.float32, target=tc.name)
    meta["target_options"] = dict(tc.options)
    save_mcore_checkpoint(student, os.path.join(d, "ckpt"), meta, hf_assets_dir=teacher_dir)
    err = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stderr(err):
        mcore_to_hf(os.path.join(d, "ckpt"), os.path.join(d, "hf"), progress=False)
    return {"seconds": time.time() - t0, "stderr": err.getvalue()}


def edit_metadata(src, dst, edit):
    """A copy of checkpoint ``src`` whose metadata went through ``edit(meta)``, written as common.pt
    (megatron-core >= 0.17's save keeps it inside the checkpoint instead; every version, and our
    reader, take common.pt first)."""
    from megatron_attnedit.convert.checkpoint import read_common_state

    shutil.copytree(src, dst)
    iter_dir = os.path.join(dst, "iter_0000000")
    state = read_common_state(iter_dir)
    edit(state["attnedit"])
    torch.save(state, os.path.join(iter_dir, "common.pt"))


def make_bad(work):
    ckpt = lambda case: os.path.join(work, case, "ckpt")  # noqa: E731
    bad = os.path.join(work, "bad")
    os.makedirs(bad)

    def setter(**kw):
        return lambda m: m.update(kw)

    def hf(**kw):
        return lambda m: m["hf_config"].update(kw)

    edits = {
        "target-missing-mla": ("mla-dense", setter(target=None, target_options=None)),
        "target-missing-gateswa": ("gateswa-dense", lambda m: (m.pop("target"), m.pop("target_options"))),
        "options-mismatch-shapes": ("mla-dense", lambda m: m["target_options"].update(kv_lora_rank=16)),
        "sinks-mismatch": ("gateswa-dense", lambda m: m["target_options"].update(sinks=False)),
        "unknown-target": ("mla-dense", setter(target="linear_attention")),
        "bad-option": ("gateswa-dense", lambda m: m["target_options"].update(gate="sideways")),
        "unknown-option": ("mla-dense", lambda m: m["target_options"].update(kv_rank=8)),
        "options-without-target": ("mla-dense", setter(target=None)),
        "mixed-mla-gqa": ("mla-dense", lambda m: m["target_options"].update(pattern="MG")),
        "dense-layers-not-prefix": ("mla-moe", hf(mlp_only_layers=[2])),
    }
    for name, (case, edit) in edits.items():
        edit_metadata(ckpt(case), os.path.join(bad, name), edit)
    return list(edits)


def main():
    work = sys.argv[1]
    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    platform.init_distributed(plat, 1, 1, 1)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 24))
    torch.save(tokens, os.path.join(work, "tokens.pt"))
    result = {}
    for name, (preset, overrides, spec) in CASES.items():
        result[name] = make_case(work, name, preset, overrides, spec, tokens)
    # bad metadata through the command line, forked from here (megatron is imported once)
    from convert_cli_cases import run_case
    from megatron_attnedit.cli.convert import mcore_to_hf_main

    result["bad"] = {n: run_case(mcore_to_hf_main, ["--load-dir", os.path.join(work, "bad", n), "--save-dir", os.path.join(work, "out", n), "--no-progress"])
                     for n in make_bad(work)}
    json.dump(result, open(os.path.join(work, "result.json"), "w"), indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
