"""The conversion round trips of tests/test_convert.py in one torchrun (2 gloo processes), to pay
the start-up once. --plan is a JSON file:

  {"to_mcore": [{"hf_dir", "save_dir", "tp", "pp", "ep", "format"}],      # phase 1, rank 0
   "megatron": [{"name", "hf_dir", "ckpt", "tp", "pp", "ep", "out"?}],      # phase 2, all ranks
   "to_hf":    [{"load_dir", "save_dir", "max_shard_size"?}],               # phase 3, rank 0
   "coverage": [{"name", "hf_dir"}]}                                        # phase 1, rank 0

Phase 1 and 3 run the library converters on rank 0 with megatron at TP=PP=EP=1 (what the CLIs do
in their own process). Phase 2 builds the model at each job's TP/PP/EP, fills it from the
converted checkpoint with ``load_mcore_checkpoint_into_model`` (torch_dist: megatron's
``dist_checkpointing.load``, resharding; legacy: the rank's own file, strict), compares every
parameter with the model filled straight from HF, and for torch_dist saves it again with
megatron's ``dist_checkpointing.save`` into ``out``. Rank 0 writes the findings to --result.
"""

import argparse
import json
import sys

import torch


def coverage(job, ModelTable):
    """Table vs a really built model (TP=1, not meta) and vs the HF file; plus proof the check bites."""
    from megatron_attnedit import families
    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.convert.layout import check_table_covers, model_layout
    from megatron_attnedit.models import builder

    cfg = families.load_hf_config(job["hf_dir"])
    table = ModelTable(cfg)
    model = builder.build_model(cfg, builder.BuildOptions())
    params = {k for k, _ in hf_io.trainable_items(model)}  # in GPTModel's names (a HybridModel's too)
    produced = set(table.megatron_names())
    hf_keys = set(hf_io.HFCheckpoint(job["hf_dir"]).keys())
    consumed = set(table.hf_names())
    layout = model_layout(cfg, table.shapes.padded_vocab_size)
    check_table_covers(layout, table)
    # the same check with one rule taken out must fail
    crippled = ModelTable(cfg)
    dropped = crippled.layer_rules[0].pop()
    try:
        check_table_covers(layout, crippled)
        bites = False
    except hf_io.CheckpointError:
        bites = True
    return {
        "params_without_rule": sorted(params - produced),
        "rules_without_param": sorted(produced - params),
        "hf_not_consumed": sorted(hf_keys - consumed),
        "consumed_not_in_hf": sorted(consumed - hf_keys),
        "meta_layout_equals_model": sorted(layout.params) == sorted(params),
        "check_fails_without_" + dropped.megatron.split(".")[-2]: bites,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    plan = json.load(open(a.plan))

    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.convert.checkpoint import load_mcore_checkpoint_into_model, save_mcore_checkpoint
    from megatron_attnedit.convert.converters import hf_to_mcore, mcore_to_hf
    from megatron_attnedit.families.table import ModelTable
    from megatron_attnedit.models import builder
    from megatron_attnedit import families

    result = {"megatron": {}, "coverage": {}}
    platform.init_distributed(plat, 1, 1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    if dist.get_rank() == 0:
        for job in plan.get("coverage", []):
            result["coverage"][job["name"]] = coverage(job, ModelTable)
        for job in plan.get("to_mcore", []):
            hf_to_mcore(job["hf_dir"], job["save_dir"], job["tp"], job["pp"], job["ep"], ckpt_format=job["format"], progress=False)
    dist.barrier()

    for job in plan.get("megatron", []):
        tp, pp, ep = job["tp"], job["pp"], job["ep"]
        platform.init_distributed(plat, tp, pp, ep)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        cfg = families.load_hf_config(job["hf_dir"])
        opts = builder.BuildOptions(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
        got = builder.build_model(cfg, opts)
        meta = load_mcore_checkpoint_into_model(got, job["ckpt"])
        ref = builder.build_model(cfg, opts)
        hf_io.load_into_model(ref, hf_io.HFCheckpoint(job["hf_dir"]), ModelTable(cfg, tp=tp))
        ref_sd = ref.state_dict()
        bad = [k for k, v in got.state_dict().items() if isinstance(v, torch.Tensor) and not torch.equal(v, ref_sd[k])]
        n = sum(1 for v in got.state_dict().values() if isinstance(v, torch.Tensor))
        if job.get("out"):
            save_mcore_checkpoint(got, job["out"], meta, hf_assets_dir=meta["hf_assets_dir"])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (bad, n))
        result["megatron"][job["name"]] = {"mismatched": sorted({k for g, _ in gathered for k in g}), "tensors": sum(c for _, c in gathered)}
        del got, ref

    platform.init_distributed(plat, 1, 1, 1)
    if dist.get_rank() == 0:
        for job in plan.get("to_hf", []):
            mcore_to_hf(job["load_dir"], job["save_dir"], max_shard_size=job.get("max_shard_size", "5GB"), progress=False)
        json.dump(result, open(a.result, "w"), indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
