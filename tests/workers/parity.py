"""Logits of the megatron model loaded from an HF checkpoint, at a given TP/PP/EP layout.

Run under torchrun (or alone for 1 process); rank 0 of the last stage writes the logits to --out.
"""

import argparse
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    a = ap.parse_args()

    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    platform.init_distributed(plat, a.tp, a.pp, a.ep)
    from megatron.core import parallel_state, tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.families.table import ModelTable
    from megatron_attnedit.models import builder, forward
    from megatron_attnedit import families

    cfg = families.load_hf_config(a.hf_dir)
    opts = builder.BuildOptions(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp, expert_model_parallel_size=a.ep)
    model = builder.build_model(cfg, opts)
    hf_io.load_into_model(model, hf_io.HFCheckpoint(a.hf_dir), ModelTable(cfg, tp=a.tp))
    tokens = torch.load(a.tokens)
    logits = forward.forward_logits(model, tokens, cfg["vocab_size"])
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
        torch.save(logits.float(), a.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
