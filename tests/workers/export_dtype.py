"""Megatron checkpoints stored in float32 (as training saves them) under teacher configs that declare
another dtype, exported through the command line, for tests/test_export_dtype.py.

    python export_dtype.py WORK

  qwen3-8b-mla   Qwen3-8B's widths (hidden 4096, 32 heads x 128, 8 KV heads, MLP 12288) as an MLA
                 student with the 8B recipe's options (kv_lora_rank 512, RoPE 64), 2 layers and a
                 4,096-row vocabulary: every per-layer tensor at its 8B shape; the full 151,936-row
                 vocabulary would add 1.2B parameters of the same two shapes (5 GB in float32 to
                 build and save on a 2-core CI machine) and prove nothing more. Declares bfloat16.
  small-*        the debug preset as teacher (no target), MLA and GateSWA students, declaring
                 bfloat16; one declaring no dtype.

Weights are uniform random (values are not what is tested). Writes WORK/result.json
{name: {rc, stdout, stderr, params}} where params counts the megatron model's parameters.
"""

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

QWEN3_8B_WIDTHS = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                       rope_theta=1000000.0, max_position_embeddings=40960, num_hidden_layers=2, vocab_size=4096)
MLA_8B = {"name": "mla", "options": {"kv_lora_rank": 512, "q_lora_rank": None, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64, "v_head_dim": 128}}
SMALL = {
    "small-teacher": (None, "bfloat16"),
    "small-mla": ({"name": "mla", "options": {"kv_lora_rank": 32, "qk_pos_emb_head_dim": 8}}, "bfloat16"),
    "small-gateswa": ({"name": "gate_swa", "options": {"pattern": "SF", "window": 8, "sinks": True}}, "bfloat16"),
    "small-mla-undeclared": ({"name": "mla", "options": {"kv_lora_rank": 32, "qk_pos_emb_head_dim": 8}}, None),
}


def save(work, name, cfg, spec):
    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.convert.checkpoint import conversion_metadata, save_mcore_checkpoint
    from megatron_attnedit.models import builder
    from megatron_attnedit.families import table
    from megatron_attnedit.targets.student import build_student

    opts = builder.BuildOptions(perform_initialization=False)
    tc = TargetConfig.from_dict(spec) if spec else None
    model = build_student(cfg, tc, opts) if tc else builder.build_model(cfg, opts)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=g)
    meta = conversion_metadata(cfg, 1, 1, 1, table.padded_vocab_size(cfg["vocab_size"], 1), "torch_dist", torch.float32,
                               target=tc.name if tc else None)
    if tc:
        meta["target_options"] = dict(tc.options)
    ckpt = os.path.join(work, name, "ckpt")
    save_mcore_checkpoint(model, ckpt, meta)
    params = sum(p.numel() for p in model.parameters())
    del model
    return ckpt, params


def main():
    work = sys.argv[1]
    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    platform.init_distributed(plat, 1, 1, 1)
    from megatron.core import tensor_parallel

    from megatron_attnedit import families

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from convert_cli_cases import run_case
    from megatron_attnedit.cli.convert import mcore_to_hf_main

    jobs = {}
    cfg = families.config_for_preset("qwen3-debug")
    cfg.update(QWEN3_8B_WIDTHS)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    jobs["qwen3-8b-mla"] = (cfg, MLA_8B, [])
    for name, (spec, dtype) in SMALL.items():
        c = families.config_for_preset("qwen3-debug")
        c.pop("torch_dtype", None)
        if dtype:
            c["dtype"] = dtype
        jobs[name] = (c, spec, [])
    jobs["small-mla-fp16"] = (jobs["small-mla"][0], SMALL["small-mla"][0], ["--dtype", "float16"])
    result = {}
    for name, (c, spec, extra) in jobs.items():
        ckpt, params = save(work, name, c, spec)
        r = run_case(mcore_to_hf_main, ["--load-dir", ckpt, "--save-dir", os.path.join(work, "out", name), "--no-progress", *extra])
        result[name] = dict(r, params=params)
        if name == "qwen3-8b-mla":
            import shutil

            shutil.rmtree(os.path.join(work, name))  # 1.7 GB of float32 checkpoint: only the export is inspected
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
