"""megatron DDP, distributed optimizer and LR schedule from the run config."""

from __future__ import annotations

import contextlib
from typing import List

import torch


def overlaps(cfg, device_type: str, dp_size: int):
    """(overlap_grad_reduce, overlap_param_gather) of this run: the recipe's, or on for GPU/NPU with
    more than one data-parallel rank (with one there is nothing to overlap, only hooks to run)."""
    p = cfg.parallel
    grad = p.overlap_grad_reduce if p.overlap_grad_reduce is not None else device_type in ("cuda", "npu") and dp_size > 1
    param = p.overlap_param_gather if p.overlap_param_gather is not None else grad
    return grad, param and cfg.optimizer.use_distributed_optimizer


def wrap_ddp(models: List[torch.nn.Module], cfg, device_type: str = "cuda") -> List[torch.nn.Module]:
    """megatron DistributedDataParallel around each chunk (contiguous grad buffers, fp32 reduce).

    With the overlaps on, the gradient buckets are reduced from DDP's backward hooks as they fill and
    the parameters are all-gathered from its forward pre-hooks; ``synced_params`` must then wrap
    anything that reads the parameters between an optimizer step and the next forward.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    grad, param = overlaps(cfg, device_type, ps.get_data_parallel_world_size(with_context_parallel=True))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=grad,
        overlap_param_gather=param,
        bucket_size=cfg.parallel.ddp_bucket_size,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop checks the loss and the grad norm itself
    )
    # Chunks after the first of a virtual pipeline would not bucket; we run one chunk per rank.
    return [DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0) for i, m in enumerate(models)]


@contextlib.contextmanager
def synced_params(models: List[torch.nn.Module]):
    """The parameters as the last optimizer step left them, for a checkpoint save or an evaluation.

    With ``overlap_param_gather`` the step only updates each rank's shard; the all-gather runs from
    the next forward's pre-hooks. Here the hooks are taken off and the gather is forced
    (Megatron-LM does the same around its saves and evaluations), then the hooks are put back.
    """
    hooked = [m for m in models if getattr(m, "use_forward_hook", False)]
    for m in hooked:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in hooked:
            m.enable_forward_pre_hook()


# Fields of our optimizer config that megatron's OptimizerConfig takes as they are, under the same name.
_SAME_NAME_IN_MEGATRON = ("optimizer", "lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
                          "use_distributed_optimizer")


def build_optimizer(cfg, models: List[torch.nn.Module], bf16: bool, device_type: str = "cuda"):
    """megatron's (distributed) mixed-precision optimizer; torch's fused AdamW kernel inside it where
    megatron falls back to torch's optimizer and ``optimizer.fused_adam`` allows."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    config = OptimizerConfig(
        **{name: getattr(o, name) for name in _SAME_NAME_IN_MEGATRON},
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    optimizer = get_megatron_optimizer(config, models)
    fused = o.fused_adam if o.fused_adam is not None else device_type == "cuda"
    if fused and o.optimizer == "adam" and getattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False):
        for opt in torch_optimizers(optimizer):
            use_fused_adam(opt)
    return optimizer


def torch_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (chained or not)."""
    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    return [c.optimizer for c in chain if isinstance(getattr(c, "optimizer", None), torch.optim.Optimizer)]


def use_fused_adam(opt: torch.optim.Optimizer) -> None:
    """Run torch's Adam/AdamW with ``fused=True`` from the next step on.

    megatron builds ``torch.optim.AdamW`` without ``fused``, so torch takes its multi-tensor
    (foreach) path: about ten kernel launches per tensor group and as many passes over the fp32
    state. The fused kernel is one pass. The flag lives in each param group, and megatron's
    checkpoint load replaces the groups (and puts ``step`` on the CPU), so a step pre-hook sets it
    before every step and moves any ``step`` that is not on its parameter's device there, as the
    fused kernel needs.
    """

    def pre_step(optimizer, args, kwargs):  # a Python pass over a few hundred shards: ~0.1 ms a step
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = True, False
            for p in group["params"]:
                st = optimizer.state.get(p)
                step = st.get("step") if st else None
                if step is not None and (not torch.is_tensor(step) or step.device != p.device):
                    st["step"] = torch.as_tensor(float(step), dtype=torch.float32, device=p.device)

    opt.register_step_pre_hook(pre_step)


def build_scheduler(cfg, optimizer):
    """Linear warmup, then cosine / WSD / linear / constant decay to min_lr, counted in iterations."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    decay = o.lr_decay_iters or cfg.training.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=decay,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.training.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,  # the recipe, not the checkpoint, decides the schedule
        wsd_decay_steps=o.lr_wsd_decay_iters or max(1, decay // 10),
        lr_wsd_decay_style=o.lr_wsd_decay_style,
    )
