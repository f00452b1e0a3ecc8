"""Quickstart-shape students of the bundled teacher, saved as megatron checkpoints and exported
through the command line, for tests/test_gguf.py.

    python gguf_students.py WORK

The MLA and GateSWA students of launch/recipes/quickstart_{mla,gateswa}.yaml (their target
options), built from the bundled teacher, attention perturbed (so that nothing equals the
teacher), saved stored in float32 as training saves them (the teacher declares bfloat16). Then
``mcore_to_hf.py --gguf``: WORK/out/mla-f32 (--dtype float32), WORK/out/mla (the declared dtype),
WORK/out/gateswa and WORK/out/no-tokenizer (a copy that carries no HF files: refused). Writes WORK/result.json {name: {rc, stdout, stderr}}. Single process, CPU.
"""

import json
import os
import shutil
import sys
import warnings

import torch
import yaml

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER = os.path.join(ROOT, "megatron_attnedit", "assets", "teachers", "qwen3-tiny-stdlib")


def recipe_target(name):
    with open(os.path.join(ROOT, "launch", "recipes", f"quickstart_{name}.yaml")) as f:
        return yaml.safe_load(f)["target"]


@torch.no_grad()
def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if ".self_attention." in name and not name.endswith("softmax_offset"):
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))


def save_student(work, name, cfg, teacher):
    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.convert.checkpoint import conversion_metadata, save_mcore_checkpoint
    from megatron_attnedit.models import builder
    from megatron_attnedit.families import table
    from megatron_attnedit.targets.student import build_student, init_student_from_teacher

    tc = TargetConfig.from_dict(recipe_target(name))
    student = build_student(cfg, tc, builder.BuildOptions())
    init_student_from_teacher(student, teacher, cfg, tc)
    perturb(student, seed=7)
    meta = conversion_metadata(cfg, 1, 1, 1, table.padded_vocab_size(cfg["vocab_size"], 1), "torch_dist", torch.float32, target=tc.name)
    meta["target_options"] = dict(tc.options)
    ckpt = os.path.join(work, name, "ckpt")
    save_mcore_checkpoint(student, ckpt, meta, hf_assets_dir=TEACHER)
    return ckpt


def main():
    work = sys.argv[1]
    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    platform.init_distributed(plat, 1, 1, 1)
    from megatron.core import tensor_parallel

    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.families.table import ModelTable
    from megatron_attnedit.models import builder
    from megatron_attnedit import families

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    cfg = families.load_hf_config(TEACHER)
    teacher = builder.build_model(cfg, builder.BuildOptions())
    hf_io.load_into_model(teacher, hf_io.HFCheckpoint(TEACHER), ModelTable(cfg))
    ckpts = {name: save_student(work, name, cfg, teacher) for name in ("mla", "gateswa")}

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from convert_cli_cases import run_case
    from megatron_attnedit.cli.convert import mcore_to_hf_main

    # a checkpoint that carries no HF files (so no tokenizer)
    from megatron_attnedit.convert.checkpoint import ASSETS

    bare = os.path.join(work, "mla-bare", "ckpt")
    shutil.copytree(ckpts["mla"], bare)
    shutil.rmtree(os.path.join(bare, "iter_0000000", ASSETS))
    out = lambda n: os.path.join(work, "out", n)  # noqa: E731
    runs = {
        "mla-f32": [ckpts["mla"], out("mla-f32"), "--dtype", "float32"],
        "mla": [ckpts["mla"], out("mla")],
        "gateswa": [ckpts["gateswa"], out("gateswa")],
        "no-tokenizer": [bare, out("no-tokenizer")],
    }
    result = {n: run_case(mcore_to_hf_main, ["--load-dir", load, "--save-dir", save, "--gguf", "--no-progress", *rest])
              for n, (load, save, *rest) in runs.items()}
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
