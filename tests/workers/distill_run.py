"""A few distillation steps on a co-located pair, driven by megatron's schedule directly (no loop):
the losses' own layout-independence, teacher forcing and storage sharing are checked on it.

Writes to --out (rank 0): {"metrics": [per-step dict of averaged metrics], "storages": {...}}.
"""

import argparse
import os
import sys

import torch


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--target", default="gqa")
    ap.add_argument("--target-options", default="{}")
    ap.add_argument("--stage2-options", default="{}")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--data-pool", type=int, default=0, help="draw batches from this many fixed micro-batches (0: fresh each step)")
    ap.add_argument("--save-init", default=None, help="write the student's initial trainable weights here")
    ap.add_argument("--load-init", default=None, help="start the student from weights written by --save-init")
    ap.add_argument("--perturb-layer", type=int, default=None,
                    help="before training: stage-1 metrics of the first batch with and without noise on this layer's attention")
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def global_named_trainable(student):
    from megatron_attnedit.convert.hf_io import global_name, rank_offsets

    from megatron_attnedit.models.layers import gpt_layout_name

    off, eoff = rank_offsets(student)
    gpt_name = gpt_layout_name(student)
    return {global_name(gpt_name(n), off, eoff): p for n, p in student.named_parameters() if p.requires_grad}


def reduced(metrics):
    """[sum, count] pairs summed over all ranks, divided."""
    names = sorted(metrics)
    vec = torch.stack([metrics[n] for n in names]).double()
    torch.distributed.all_reduce(vec)
    return {n: (vec[i, 0] / vec[i, 1]).item() for i, n in enumerate(names)}


def teacher_forcing_check(a, stage, student, named, vocab):
    """Stage-1 metrics on one batch, then again after adding noise to one layer's attention
    (restored afterwards): only that layer's loss may change."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_attnedit.models import forward

    tok = torch.randint(0, vocab, (a.mbs, a.seq), generator=torch.Generator().manual_seed(5))
    batch = {"tokens": tok, "labels": tok, "position_ids": forward.position_ids(tok), "loss_mask": torch.ones(a.mbs, a.seq)}

    def measure():
        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=stage.forward_step, data_iterator=iter([batch]), model=[student],
                                        num_microbatches=1, seq_length=a.seq, micro_batch_size=a.mbs, forward_only=True)
        return reduced(stage.step_metrics())

    before = measure()
    saved = {k: p.detach().clone() for k, p in named.items()}
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for k, p in named.items():
            if k.startswith(f"decoder.layers.{a.perturb_layer}."):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    after = measure()
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(saved[k])
    return {"before": before, "after": after}


def main():
    a = parse()
    import json

    from megatron_attnedit import platform

    plat = platform.init_platform("cpu")
    platform.init_distributed(plat, a.tp, a.pp, 1)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.distill import colocate
    from megatron_attnedit.models import builder, forward
    from megatron_attnedit.models.layers import gpt_layout_name
    from megatron_attnedit import families

    hf = families.load_hf_config(a.hf_dir)
    opts = builder.BuildOptions(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp)
    target = TargetConfig(a.target, json.loads(a.target_options))
    trainable = json.loads(a.stage2_options).get("trainable", "attention") if a.stage == 2 else "attention"
    pair = colocate.colocate(hf, target, opts, colocate.hf_loader(a.hf_dir, hf, opts), trainable=trainable)
    student = pair.student

    # storage accounting before anything else touches the models
    attn = [p for p in student.parameters() if p.requires_grad]
    store = {
        "pair": len(colocate.storages(pair.teacher, student)),
        "teacher": len(colocate.storages(pair.teacher)),
        "attention": len({p.untyped_storage().data_ptr() for p in attn}),
        "student_alone": len(colocate.storages(student)),
        "shared": [gpt_layout_name(pair.student)(p) for p in pair.shared],  # GPTModel module names
    }

    named = global_named_trainable(student)
    if a.save_init and parallel_state.get_tensor_model_parallel_world_size() == 1:
        torch.save({k: v.detach().clone() for k, v in named.items()}, a.save_init + f".pp{parallel_state.get_pipeline_model_parallel_rank()}")
    if a.load_init:
        init = {}
        for f in sorted(os.listdir(os.path.dirname(a.load_init))):
            if f.startswith(os.path.basename(a.load_init) + ".pp"):
                init.update(torch.load(os.path.join(os.path.dirname(a.load_init), f)))
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(init[k])
    if a.stage == 1:
        from megatron_attnedit.distill.stage1 import Stage1

        stage = Stage1(pair)
    else:
        from megatron_attnedit.distill.stage2 import Stage2

        stage = Stage2(pair, **json.loads(a.stage2_options))
    perturb = None
    if a.perturb_layer is not None:
        perturb = teacher_forcing_check(a, stage, student, named, hf["vocab_size"])
    opt = torch.optim.Adam(pair.trainable_parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(99)
    V = hf["vocab_size"]
    history = []
    fb = get_forward_backward_func()
    pool = [torch.randint(0, V, (a.mbs, a.seq + 1), generator=gen) for _ in range(a.data_pool)]
    for step in range(a.steps):
        batches = []
        for i in range(a.micro_batches):
            if pool:
                tok = pool[(step * a.micro_batches + i) % len(pool)]
            else:
                tok = torch.randint(0, V, (a.mbs, a.seq + 1), generator=gen)
            batches.append({
                "tokens": tok[:, :-1].contiguous(), "labels": tok[:, 1:].contiguous(),
                "position_ids": forward.position_ids(tok[:, :-1]), "loss_mask": torch.ones(a.mbs, a.seq),
            })
        opt.zero_grad()
        for p in pair.trainable_parameters():
            p.grad = None
        fb(forward_step_func=stage.forward_step, data_iterator=iter(batches), model=[student],
           num_microbatches=a.micro_batches, seq_length=a.seq, micro_batch_size=a.mbs, forward_only=False)
        history.append(reduced(stage.step_metrics()))
        opt.step()
    if torch.distributed.get_rank() == 0:
        torch.save({"metrics": history, "storages": store, "perturb": perturb,
                    "n_trainable": sum(p.numel() for p in pair.trainable_parameters()),
                    "n_student": sum(p.numel() for p in student.parameters())}, a.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
