"""megatron DDP, distributed optimizer and LR schedule from the run config."""

from __future__ import annotations

from typing import List

import torch


def wrap_ddp(models: List[torch.nn.Module], cfg) -> List[torch.nn.Module]:
    """megatron DistributedDataParallel around each chunk (contiguous grad buffers, fp32 reduce)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop checks the loss and the grad norm itself
    )
    # Chunks after the first of a virtual pipeline would not bucket; we run one chunk per rank.
    return [DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0) for i, m in enumerate(models)]


def build_optimizer(cfg, models: List[torch.nn.Module], bf16: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    config = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, models)


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
