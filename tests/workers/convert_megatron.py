"""Megatron's side of the conversion tests, on 2 gloo processes (run under torchrun).

For each job (a JSON list in --jobs): build the model at the job's TP/PP/EP, fill it from the
converted checkpoint with ``load_mcore_checkpoint_into_model`` (torch_dist: megatron's
``dist_checkpointing.load``, resharding; legacy: this rank's mp_rank file, strict), compare every
parameter with the same model filled straight from the HF checkpoint, and for torch_dist save it
again with megatron's own ``dist_checkpointing.save`` (``save_mcore_checkpoint``) into job["out"].
Rank 0 writes {"job name": [mismatched parameter names]} to --result.
"""

import argparse
import json
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    jobs = json.load(open(a.jobs))

    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.convert.checkpoint import load_mcore_checkpoint_into_model, save_mcore_checkpoint
    from megatron_attnedit.convert.qwen3 import ModelTable
    from megatron_attnedit.models import qwen3

    result = {}
    for job in jobs:
        tp, pp, ep = job["tp"], job["pp"], job["ep"]
        platform.init_distributed(plat, tp, pp, ep)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        cfg = qwen3.load_hf_config(job["hf_dir"])
        opts = qwen3.BuildOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
        got = qwen3.build_model(cfg, opts)
        meta = load_mcore_checkpoint_into_model(got, job["ckpt"])
        ref = qwen3.build_model(cfg, opts)
        hf_io.load_into_model(ref, hf_io.HFCheckpoint(job["hf_dir"]), ModelTable(cfg, tp=tp))
        ref_sd = ref.state_dict()
        bad = [k for k, v in got.state_dict().items() if isinstance(v, torch.Tensor) and not torch.equal(v, ref_sd[k])]
        if job.get("out"):
            save_mcore_checkpoint(got, job["out"], meta, hf_assets_dir=meta["hf_assets_dir"])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, bad)
        result[job["name"]] = sorted({k for g in gathered for k in g})
        del got, ref
    if dist.get_rank() == 0:
        json.dump(result, open(a.result, "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
