"""Checkpoints of the trained model: megatron distributed checkpoints, written atomically.

Layout (Megatron-LM's): ``<save>/iter_0000010/`` (a dist_checkpointing directory) and
``<save>/latest_checkpointed_iteration.txt``. A checkpoint holds the trained model only (never the
teacher), the optimizer (sharded like the distributed optimizer), the LR scheduler, every rank's
RNG states (one ShardedObject per rank), the objective's extra state, the iteration and the data
position (consumed samples), plus the resolved run config (``config.yaml``). The converters' metadata
(``convert.checkpoint.ATTNEDIT_KEY``: HF config, attention target, padded vocabulary, layout) and
the HF side files (``hf_assets/``: config, tokenizer) travel inside, so ``mcore_to_hf.py`` and
``load_mcore_checkpoint_into_model`` take a training checkpoint as it is.

Atomicity: every rank writes into ``iter_XXXXXXX.tmp``; after all have finished, rank 0 renames it
to ``iter_XXXXXXX`` and only then rewrites ``latest_checkpointed_iteration.txt`` (via a temporary
file and ``os.replace``). A crash at any point leaves the previous checkpoint as the latest one.
The save directory must be on a file system shared by all nodes (as for Megatron-LM).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_attnedit.config import ConfigError
from megatron_attnedit.convert import checkpoint as ckpt_dirs
from megatron_attnedit.errors import UserError
from megatron_attnedit.training.optim import torch_optimizers

LATEST = "latest_checkpointed_iteration.txt"
SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}  # Megatron-LM default; optimizer reshardable over DP


class CheckpointError(UserError):
    """A checkpoint that cannot be used; one line saying what to do."""


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by ``latest_checkpointed_iteration.txt`` in ``root``, None without one."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; fix or delete it")
    it = int(text)
    if not os.path.isfile(os.path.join(iter_dir(root, it), "metadata.json")):
        raise CheckpointError(f"{path} names iteration {it} but {iter_dir(root, it)} is missing or incomplete")
    return it


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def _model_sharded_state_dict(models) -> dict:
    chunks = [_unwrap(m) for m in models]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(models, loaded: dict) -> None:
    chunks = [_unwrap(m) for m in models]
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)


# ------------------------------------------------------------------------------------------------
# RNG states (kept as tensors and plain Python values: loadable with torch.load(weights_only=True))
# ------------------------------------------------------------------------------------------------


def rng_state(plat) -> dict:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    accel = torch.npu if plat.name == "npu" else torch.cuda  # type: ignore[attr-defined]
    return {
        "random": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "accel": accel.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(plat, state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    accel = torch.npu if plat.name == "npu" else torch.cuda  # type: ignore[attr-defined]
    accel.set_rng_state(state["accel"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _save_strategy():
    """torch_dist, with the writing of replicated tensors spread over the data-parallel ranks
    (otherwise data-parallel rank 0 of every model shard writes it all)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), parallel_state.get_data_parallel_group(with_context_parallel=True))


def _per_rank(key: str, data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(key, data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# ------------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores everything a resumed run needs (see the module docstring)."""

    def __init__(self, cfg, plat, models: List[torch.nn.Module], optimizer, scheduler, objective, hf_config: dict):
        self.cfg, self.plat = cfg, plat
        self.models, self.optimizer, self.scheduler, self.objective = models, optimizer, scheduler, objective
        self.hf_config = hf_config
        self.root = cfg.save_dir
        if dist.get_rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # leftovers of a run killed while saving
                if name.startswith("iter_") and name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        dist.barrier()

    def _layout(self) -> dict:
        from megatron.core import parallel_state as ps

        return {
            "world_size": dist.get_world_size(),
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            # The distributed optimizer's flat state follows the expert modules' parameter layout.
            "moe_grouped_gemm": bool(self.cfg.model.moe_grouped_gemm),
        }

    def save(self, state: TrainState) -> str:
        from megatron.core import dist_checkpointing

        final = iter_dir(self.root, state.iteration)
        tmp = final + ".tmp"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        sd = _model_sharded_state_dict(self.models)
        sd["optimizer"] = self.optimizer.sharded_state_dict(sd, is_loading=False, metadata=SHARDING)
        sd.update(
            {ckpt_dirs.ATTNEDIT_KEY: self._conversion_metadata()},
            checkpoint_version=3.0,
            scheduler=self.scheduler.state_dict(),
            iteration=state.iteration,
            consumed_samples=state.consumed_samples,
            layout=self._layout(),
            rng_state=_per_rank("rng_state", rng_state(self.plat)),
            objective_state=_per_rank("objective_state", self.objective.state_dict()),
        )
        dist_checkpointing.save(sd, tmp, sharded_strategy=_save_strategy(), content_metadata=dict(SHARDING))  # ends with a barrier
        if dist.get_rank() == 0:
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(self.cfg.to_yaml())
            self._copy_hf_assets(tmp)
            if os.path.isdir(final):  # the same iteration saved again (after a resume)
                shutil.rmtree(final)
            os.rename(tmp, final)
            marker = os.path.join(self.root, LATEST + ".tmp")
            with open(marker, "w") as f:
                f.write(str(state.iteration))
                f.flush()
                os.fsync(f.fileno())
            os.replace(marker, os.path.join(self.root, LATEST))
            self._prune(state.iteration)
        dist.barrier()
        return final

    def _conversion_metadata(self) -> dict:
        from megatron_attnedit.models.qwen3 import padded_vocab_size

        lay = self._layout()
        tp, pp, ep = (lay[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
        dtype = next(p for m in self.models for p in _unwrap(m).parameters()).dtype
        meta = ckpt_dirs.conversion_metadata(self.hf_config, tp, pp, ep, padded_vocab_size(self.hf_config["vocab_size"], tp),
                                             "torch_dist", dtype, target=self.cfg.target.name)
        meta["target_options"] = dict(self.cfg.target.options)
        return meta

    def _copy_hf_assets(self, iter_path: str) -> None:
        """HF config/tokenizer files next to the weights (from model.hf_dir, else the tokenizer)."""
        src = self.cfg.model.hf_dir or self.cfg.tokenizer_dir
        if src and os.path.isdir(src):
            ckpt_dirs.copy_hf_assets(src, iter_path)
        elif src and src.endswith(".model") and os.path.isfile(src):
            os.makedirs(os.path.join(iter_path, ckpt_dirs.ASSETS), exist_ok=True)
            shutil.copyfile(src, os.path.join(iter_path, ckpt_dirs.ASSETS, "tokenizer.model"))

    def _prune(self, newest: int) -> None:
        keep = self.cfg.checkpoint.keep_last_n
        if keep <= 0:
            return
        its = sorted(int(n[5:]) for n in os.listdir(self.root) if n.startswith("iter_") and n[5:].isdigit())
        for it in its[:-keep]:
            if it != newest:
                shutil.rmtree(iter_dir(self.root, it), ignore_errors=True)

    def load(self) -> Optional[TrainState]:
        """Resume from the latest checkpoint of cfg.load_dir; None when there is none."""
        from megatron.core import dist_checkpointing

        root = self.cfg.load_dir
        it = latest_iteration(root) if os.path.isdir(root) else None
        if it is None:
            return None
        d = iter_dir(root, it)
        common = dist_checkpointing.load_common_state_dict(d)
        grouped = common.get("layout", {}).get("moe_grouped_gemm")
        if grouped is not None and grouped != bool(self.cfg.model.moe_grouped_gemm) and _has_experts(self.models):
            raise ConfigError(
                f"{d} was saved with model.moe_grouped_gemm={str(grouped).lower()} and this run sets "
                f"{str(not grouped).lower()}: the optimizer state cannot move between the two expert layouts; resume with "
                f"model.moe_grouped_gemm={str(grouped).lower()}, or start a new run from its weights with checkpoint.pretrained_checkpoint={root}"
            )
        same_world = common.get("layout", {}).get("world_size") == dist.get_world_size()
        _materialize_optimizer_state(self.optimizer)
        sd = _model_sharded_state_dict(self.models)
        sd["optimizer"] = self.optimizer.sharded_state_dict(sd, is_loading=True, metadata=SHARDING)
        if same_world:  # RNG and objective state are per rank: only meaningful on the same world
            sd["rng_state"] = _per_rank("rng_state", None)
            sd["objective_state"] = _per_rank("objective_state", None)
        loaded = dist_checkpointing.load(sd, d)
        with torch.no_grad():  # fp32 main params are views of the (leaf) model params
            _load_model_state(self.models, loaded)
            self.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(self.optimizer)
        self.scheduler.load_state_dict(common["scheduler"])
        if same_world:
            set_rng_state(self.plat, loaded["rng_state"])
            self.objective.load_state_dict(loaded["objective_state"])
        elif dist.get_rank() == 0:
            print(f"note: {d} was saved on {common.get('layout', {}).get('world_size')} ranks, this run has "
                  f"{dist.get_world_size()}: RNG and objective states start fresh", flush=True)
        return TrainState(iteration=int(common["iteration"]), consumed_samples=int(common["consumed_samples"]))


def _has_experts(models) -> bool:
    return any(".experts." in name for m in models for name, _ in m.named_parameters())


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors (and Adam's step) so that a checkpoint can be loaded
    into them: megatron 0.16 reads ``step`` from the torch optimizer's state when neither
    transformer-engine nor apex is installed, and that state only exists after a first step. The
    zero-gradient step changes parameters by weight decay only; the load overwrites all of it."""
    for inner in torch_optimizers(optimizer):
        if len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)


def _unshare_adam_steps(optimizer) -> None:
    """Repair Adam's per-parameter ``step`` after a load (megatron 0.16 without TE/apex): the
    loader puts one shared step tensor into every parameter's state (torch increments each in
    place, so it would advance once per parameter) and then overwrites it with the placeholder
    step of the parameter-state shards. The true step is the one kept in the param groups."""
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    step = group.get("step")
                    st["step"] = st["step"].clone() if step is None else torch.full_like(st["step"], float(step))


def load_model_weights(models, path: str) -> str:
    """Initialise ``models`` from the model part of a megatron checkpoint (a save directory or one
    iteration directory) written by this loop or by checkpoints_tools/hf_to_mcore.py."""
    for m in models:
        meta = ckpt_dirs.load_mcore_checkpoint_into_model(_unwrap(m), path)
    return meta["iter_dir"]
