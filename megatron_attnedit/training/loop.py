"""The training loop: one loop for every stage; an Objective (training/objective.py) says what a step is.

Per step: megatron's forward-backward schedule (no pipelining, or 1F1B under PP) runs the
objective's ``forward_step`` over the micro-batches of one global batch; DDP reduces gradients
over data-parallel ranks (``finalize_model_grads``); the distributed optimizer clips and steps;
the scheduler sets the next learning rate. A non-finite loss or gradient norm stops the run
before anything is saved, so the last good checkpoint stays the latest one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_attnedit import platform
from megatron_attnedit.config import Config
from megatron_attnedit.errors import ConfigError, TrainingStopped
from megatron_attnedit import errors
from megatron_attnedit.training import checkpoint as ckpt_lib
from megatron_attnedit.training import data as data_lib
from megatron_attnedit.training import objective as objective_lib
from megatron_attnedit.training.monitor import Monitor, memory_gb
from megatron_attnedit.training.optim import build_optimizer, build_scheduler, synced_params, wrap_ddp



# ------------------------------------------------------------------------------------------------
# Metrics: the objective's per-micro-batch values, reduced over micro-batches and all ranks
# ------------------------------------------------------------------------------------------------


class MetricCollector:
    """Wraps ``forward_step`` so that every ``loss_func`` result is recorded as (sum, count) pairs."""

    def __init__(self):
        self.values: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def add(self, name: str, value) -> None:
        v = torch.as_tensor(value).detach().float().reshape(-1)
        one = torch.ones((), device=v.device)
        self.values[name].append((v[0], v[1]) if v.numel() == 2 else (v[0], one))

    def wrap(self, forward_step: Callable) -> Callable:
        def step(data_iterator, model):
            output, loss_func = forward_step(data_iterator, model)

            def recorded(output_tensor, *args, **kwargs):
                result = loss_func(output_tensor, *args, **kwargs)
                if kwargs.get("non_loss_data"):
                    return result
                if len(result) == 3:  # (loss_sum, num_tokens, metrics): the schedule divides in place
                    loss, count, metrics = result
                    self.add("loss", torch.stack([loss.detach().clone().float(), torch.as_tensor(count).float().to(loss.device)]))
                else:
                    loss, metrics = result
                    self.add("loss", loss.detach().clone())
                for k, v in (metrics or {}).items():
                    self.add(k, v)
                return result

            return output, recorded

        return step

    def take(self) -> Dict[str, Tuple[float, float]]:
        out = {k: (float(sum(s for s, _ in v)), float(sum(c for _, c in v))) for k, v in self.values.items()}
        self.values.clear()
        return out


def reduce_metrics(local: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
    """sum/count per name over all ranks (TP duplicates cancel, DP replicas average, PP stages merge)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    total: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
    for part in gathered:
        for k, (s, c) in part.items():
            total[k][0] += s
            total[k][1] += c
    return {k: s / c if c else float("nan") for k, (s, c) in sorted(total.items(), key=lambda kv: kv[0] != "loss")}


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    """Same seed on every rank for data and init; megatron's tracker offsets TP ranks for dropout."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def check_length(cfg: Config, hf: dict, rank0: bool) -> None:
    """data.seq_length within the model's max_position_embeddings, or beyond it only when asked for."""
    trained = hf.get("max_position_embeddings")
    if trained is None or cfg.data.seq_length <= int(trained):
        return
    src = f"{cfg.model.hf_dir}/config.json" if cfg.model.hf_dir else f"preset {cfg.model.preset}"
    if not cfg.data.allow_longer_than_trained:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} is longer than the model's max_position_embeddings={trained} ({src}); "
                          "shorten data.seq_length, or set data.allow_longer_than_trained=true to train on positions it has not seen")
    if rank0:
        print(f"warning: data.seq_length={cfg.data.seq_length} is longer than the model's max_position_embeddings={trained} ({src}); "
              "training beyond it (data.allow_longer_than_trained=true)", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """Everything a step needs, built once by ``setup``."""

    plat: Any
    objective: objective_lib.Objective
    models: List[torch.nn.Module]  # DDP-wrapped chunks of the trained model
    optimizer: Any
    scheduler: Any
    checkpointer: ckpt_lib.Checkpointer
    state: ckpt_lib.TrainState
    train: data_lib.MicroBatches
    valid: Optional[Callable[[], data_lib.MicroBatches]]  # fresh from the start of the split per evaluation
    num_micro: int  # micro-batches per step per data-parallel rank
    n_train: int
    resumed: bool


def setup(cfg: Config) -> Run:
    """Platform, process groups, objective, models, optimizer, checkpoint, data: ready to step."""
    p = cfg.parallel
    plat = platform.init_platform(cfg.training.platform)
    platform.init_distributed(plat, p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size)
    from megatron.core import parallel_state as ps

    dp, d = ps.get_data_parallel_world_size(), cfg.data
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} must be a multiple of micro_batch_size x data-parallel size = {d.micro_batch_size} x {dp}")
    set_seed(cfg.training.seed)
    tokenizer = data_lib.Tokenizer(cfg.tokenizer_dir)
    hf = objective_lib.hf_config(cfg)
    check_length(cfg, hf, dist.get_rank() == 0)
    data_lib.check_tokenizer(tokenizer, int(hf["vocab_size"]), d.data_path)
    objective = objective_lib.create(cfg.objective.name, cfg.objective.options)
    resume_point = ckpt_lib.find_resume(cfg)
    models = objective.build(cfg, plat)
    if resume_point is None and cfg.checkpoint.pretrained_checkpoint:
        ckpt_lib.load_model_weights(models, cfg.checkpoint.pretrained_checkpoint, cfg, hf)
    n_train = 0
    for m in models:
        for name, param in m.named_parameters():
            param.requires_grad_(bool(objective.is_trainable(name, param)))
            n_train += param.numel() if param.requires_grad else 0
    counts = torch.tensor([n_train], dtype=torch.long, device=plat.device)
    dist.all_reduce(counts, group=ps.get_model_parallel_group())  # one replica's parameters
    if counts.item() == 0:
        raise ConfigError(f"objective {cfg.objective.name!r} marks no parameter as trainable")

    bf16 = objective_lib.use_bf16(cfg, plat)
    models = wrap_ddp(models, cfg, plat.device.type)
    optimizer = build_optimizer(cfg, models, bf16, plat.device.type)
    scheduler = build_scheduler(cfg, optimizer)
    checkpointer = ckpt_lib.Checkpointer(cfg, plat, models, optimizer, scheduler, objective, hf)
    state = checkpointer.load(resume_point) or ckpt_lib.TrainState()

    def write_config():  # only now: a refused resume leaves the run's config.yaml as it was
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())

    ckpt_lib.on_rank0(write_config)

    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(models[0])
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = models[0].no_sync if len(models) == 1 else [m.no_sync for m in models]
    config.finalize_model_grads_func = finalize_model_grads

    gb, t = d.global_batch_size, cfg.training
    n_evals = t.train_iters // t.eval_interval + 1 if t.eval_interval else 0
    train_ds, valid_ds = data_lib.build_datasets(cfg, tokenizer, t.train_iters * gb, n_evals and t.eval_iters * gb)
    batches = lambda ds, consumed: data_lib.MicroBatches(ds, consumed, d.micro_batch_size, gb, ps.get_data_parallel_rank(), dp, plat.device)  # noqa: E731
    return Run(plat=plat, objective=objective, models=models, optimizer=optimizer, scheduler=scheduler, checkpointer=checkpointer,
               state=state, train=batches(train_ds, state.consumed_samples), valid=valid_ds and (lambda: batches(valid_ds, 0)),
               num_micro=gb // (d.micro_batch_size * dp), n_train=int(counts.item()), resumed=state.iteration > 0)


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def _forward_backward(s: Run, cfg: Config, batches, forward_only: bool, collector: MetricCollector) -> Dict[str, float]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    objective = s.objective
    fb = objective.forward_backward_func() if hasattr(objective, "forward_backward_func") else get_forward_backward_func()
    fb(forward_step_func=collector.wrap(objective.forward_step), data_iterator=batches, model=s.models,
       num_microbatches=s.num_micro, seq_length=cfg.data.seq_length, micro_batch_size=cfg.data.micro_batch_size,
       forward_only=forward_only)
    local = collector.take()
    for k, v in (objective.step_metrics() if hasattr(objective, "step_metrics") else {}).items():
        collector.add(k, v)
    local.update(collector.take())
    return reduce_metrics(local)


def train_step(s: Run, cfg: Config) -> Dict[str, float]:
    models, optimizer = s.models, s.optimizer
    for m in models:
        m.train()
        m.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = _forward_backward(s, cfg, s.train.step(), False, MetricCollector())
    it = s.state.iteration + 1
    if not math.isfinite(metrics.get("loss", 0.0)):
        raise TrainingStopped(f"loss is {metrics.get('loss')} at iteration {it}")
    _, grad_norm, _ = optimizer.step()
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise TrainingStopped(f"gradient norm is {grad_norm} at iteration {it}")
    s.scheduler.step(increment=1)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = max(g["lr"] for g in optimizer.param_groups)
    return metrics


@torch.no_grad()
def evaluate(s: Run, cfg: Config) -> Dict[str, float]:
    for m in s.models:
        m.eval()
    collector, valid, sums = MetricCollector(), s.valid(), defaultdict(float)
    for _ in range(cfg.training.eval_iters):
        for k, v in _forward_backward(s, cfg, valid.step(), True, collector).items():
            sums[k] += v / cfg.training.eval_iters
    return {f"val_{k}": v for k, v in sums.items()}


def _maybe_start_profiler(cfg: Config, step: int, plat, profiler):
    """The running torch.profiler, started at the first of training.profile_steps on rank 0."""
    ps = cfg.training.profile_steps
    if profiler is None and ps and step == ps[0] and dist.get_rank() == 0:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if plat.name == "cuda" else [])
        profiler = torch.profiler.profile(activities=acts, record_shapes=False)
        profiler.__enter__()
    return profiler


def _maybe_stop_profiler(cfg: Config, step: int, plat, profiler):
    """At the last of training.profile_steps: write the trace and kernel table; returns what is still running."""
    ps = cfg.training.profile_steps
    if profiler is None or step != ps[1]:
        return profiler
    plat.synchronize()
    profiler.__exit__(None, None, None)
    out = os.path.join(cfg.run_dir, "profile")
    os.makedirs(out, exist_ok=True)
    profiler.export_chrome_trace(os.path.join(out, f"trace_steps_{ps[0]}_{ps[1]}.json"))
    sort = "cuda_time_total" if plat.name == "cuda" else "cpu_time_total"
    with open(os.path.join(out, "kernels.txt"), "w") as f:
        f.write(profiler.key_averages().table(sort_by=sort, row_limit=40))
    return None


def train(cfg: Config) -> Dict[str, float]:
    """Run (or resume) the training described by ``cfg``; returns the last logged metrics."""
    s = setup(cfg)
    state, t, ckpt = s.state, cfg.training, s.checkpointer
    monitor = Monitor(cfg, dist.get_rank())
    built = memory_gb(s.plat)
    monitor.print(f"{cfg.name}: objective {cfg.objective.name}, {s.n_train:,} trainable parameters, "
                  f"{'resumed at' if s.resumed else 'starting at'} iteration {state.iteration}/{t.train_iters}, "
                  f"{s.num_micro} micro-batch(es) per step per data-parallel rank, run dir {cfg.run_dir}"
                  + (f", {built:.1f} GiB peak memory while building" if built is not None and s.plat.name != "cpu" else ""))
    s.plat.reset_peak_memory()  # mem_gb below: the training steps' peak
    errors.started()  # from here on, an environment fault (disk full while saving) is a fault of the run: exit 1
    monitor.start_progress(state.iteration, t.train_iters)
    window, logged = defaultdict(float), {}
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_length
    start, n_window, exit_code, profiler = time.time(), 0, 1, None
    try:
        while state.iteration < t.train_iters:
            profiler = _maybe_start_profiler(cfg, state.iteration + 1, s.plat, profiler)
            metrics = train_step(s, cfg)
            profiler = _maybe_stop_profiler(cfg, state.iteration + 1, s.plat, profiler)
            state.iteration += 1
            state.consumed_samples += cfg.data.global_batch_size
            monitor.step()
            for k, v in metrics.items():
                window[k] += v
            n_window += 1
            if state.iteration % t.log_interval == 0 or state.iteration == t.train_iters:
                s.plat.synchronize()
                elapsed = time.time() - start
                logged = {k: v / n_window for k, v in window.items()}
                logged.update(lr=metrics["lr"], tokens_per_s=tokens_per_step * n_window / elapsed, samples=state.consumed_samples)
                mem = memory_gb(s.plat)
                if mem is not None:
                    logged["mem_gb"] = mem
                monitor.log(state.iteration, logged)
                window, n_window, start = defaultdict(float), 0, time.time()
            if s.valid and t.eval_interval and state.iteration % t.eval_interval == 0:
                with synced_params(s.models):
                    val = evaluate(s, cfg)
                monitor.log(state.iteration, val)
                logged.update(val)
                start = time.time()  # tokens/s counts training only
            interval = cfg.checkpoint.save_interval
            if (interval and state.iteration % interval == 0) or state.iteration == t.train_iters:
                with synced_params(s.models):
                    ckpt.save(state)
                start = time.time()
        exit_code = 0
    except TrainingStopped as e:
        kept = ckpt_lib.latest_iteration(cfg.save_dir)
        where = f"the last good checkpoint is iteration {kept} in {cfg.save_dir}" if kept is not None else "no checkpoint was saved"
        raise TrainingStopped(f"{e}; stopped without saving, {where}") from None
    finally:
        monitor.close(exit_code)
    return logged
