"""Checkpoints of the trained model: megatron distributed checkpoints, written atomically.

Layout (Megatron-LM's): ``<save>/iter_0000010/`` (a dist_checkpointing directory) and
``<save>/latest_checkpointed_iteration.txt``. A checkpoint holds the trained model only (never the
teacher), the optimizer (sharded like the distributed optimizer), the LR scheduler, every rank's
RNG states (one ShardedObject per rank), the objective's extra state, the iteration and the data
position (consumed samples), plus the resolved run config (``config.yaml``). The converters' metadata
(``convert.checkpoint.ATTNEDIT_KEY``: HF config, attention target, padded vocabulary, layout) and
the HF side files (``hf_assets/``: config, tokenizer) travel inside, so ``mcore_to_hf.py`` and
``load_mcore_checkpoint_into_model`` take a training checkpoint as it is.

Atomicity: every rank writes into ``iter_XXXXXXX.tmp``; after all have finished, rank 0 adds the
side files and, last, the manifest (training/manifest.py: every file's size and checksum), renames
the directory to ``iter_XXXXXXX`` and only then rewrites ``latest_checkpointed_iteration.txt`` (via
a temporary file and ``os.replace``). A crash at any point leaves the previous checkpoint as the
latest one; a save that fails (disk full) removes its ``.tmp`` and stops the run in one line.
Resume takes the newest complete checkpoint and refuses one that does not fit the run
(training/resume.py). The save directory must be on a file system shared by all nodes (as for
Megatron-LM).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import sys
from typing import Any, Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_attnedit import errors
from megatron_attnedit.convert import checkpoint as ckpt_dirs
from megatron_attnedit.errors import (
    CheckpointError,  # noqa: F401  (re-exported)
    ConfigError,
    RunFault,
)
from megatron_attnedit.families.table import padded_vocab_size
from megatron_attnedit.training import manifest, resume
from megatron_attnedit.training.optim import torch_optimizers
from megatron_attnedit.training.resume import LATEST, ResumePoint, iter_dir, read_latest

SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}  # Megatron-LM default; optimizer reshardable over DP


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def _failures():
    """What dist_checkpointing raises: torch's CheckpointException derives from BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def failure_reason(e: BaseException) -> str:
    """One line for an exception of a save or load: the first rank's underlying error (torch's
    CheckpointException carries them per rank), an OSError in the chain said as errors.py says it."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = failures[min(failures)]
        e = inner[0] if isinstance(inner, tuple) else inner
    cause, seen = e, set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno is not None:
            return errors.describe_os_error(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if text.startswith("Worker failure: "):  # megatron's file writer: the worker's own error follows
        text = text[len("Worker failure: "):]
    elif text:
        text = f"{type(e).__name__}: {text}"
    if "unexpected pos" in text:  # torch's zip writer when a write came up short
        text += " (a write was cut short: disk full or a file size limit?)"
    text = errors.one_line(text or type(e).__name__)
    return text if len(text) <= 240 else text[:237] + "..."


def _shareable(e: BaseException) -> BaseException:
    """``e`` if it pickles (to be raised on every rank), else a RuntimeError with its line."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(failure_reason(e))


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result to every rank; what it raises is raised on
    every rank, so the others exit with the same code instead of waiting in the next collective."""
    out = [None, None]
    if dist.get_rank() == 0:
        try:
            out[0] = fn()
        except Exception as e:
            out[1] = _shareable(e)
    dist.broadcast_object_list(out, src=0)
    if out[1] is not None:
        raise out[1]
    return out[0]


def find_resume(cfg) -> Optional[ResumePoint]:
    """Where this run resumes (collective; training/resume.py decides on rank 0, which prints the
    iterations it passed over). Also refuses a save directory of its own (checkpoint.save other than
    checkpoint.load) that holds iterations without a latest file."""

    def decide():
        if os.path.abspath(cfg.save_dir) != os.path.abspath(cfg.load_dir):
            resume.refuse_unnamed_iterations(cfg.save_dir, "checkpoint.save")
        point = resume.choose(cfg.load_dir)
        if point is not None and point.note():
            print(point.note(), file=sys.stderr, flush=True)
        return point

    return on_rank0(decide)


def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by ``latest_checkpointed_iteration.txt`` in ``root``, None without one."""
    return read_latest(root)


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
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), parallel_state.get_data_parallel_group(with_context_parallel=True))


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_space(root: str) -> str:
    """'; N free on its device' -- and when that is less than the newest checkpoint there takes
    (what the failed save needed, about), that the disk is full."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    kept = read_latest(root)
    need = 0
    if kept is not None:
        for base, _, names in os.walk(iter_dir(root, kept)):
            need += sum(os.path.getsize(os.path.join(base, n)) for n in names)
    if free < need:
        return f"; {_size(free)} free on its device, less than the {_size(need)} of the previous checkpoint: the disk is full"
    return f"; {_size(free)} free on its device"


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

        def remove_leftovers():  # of a run killed while saving; the directory itself is made by the first save
            for name in os.listdir(self.root) if os.path.isdir(self.root) else []:
                if name.startswith("iter_") and name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

        on_rank0(remove_leftovers)

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
        """Write iteration ``state.iteration`` (collective). A failure on any rank (disk full)
        removes the ``.tmp`` directory and raises RunFault on every rank: the previous checkpoint
        stays the latest one."""
        from megatron.core import dist_checkpointing

        final = iter_dir(self.root, state.iteration)
        tmp = final + ".tmp"
        rank0 = dist.get_rank() == 0

        def prepare():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

        original = None  # this rank's exception, kept as the cause for --debug
        failed = self._shared_failure(prepare if rank0 else None)
        if failed is None:
            try:
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
                # ends with a barrier; a write failure on any rank is raised on every rank
                dist_checkpointing.save(sd, tmp, sharded_strategy=_save_strategy(), content_metadata=dict(SHARDING))
            except _failures() as e:
                original = e
            failed = self._shared_failure(lambda: self._finish(tmp, final, state.iteration) if rank0 and original is None else None, original)
        if failed is not None:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            kept = read_latest(self.root)
            where = f"the latest checkpoint is still iteration {kept} ({iter_dir(self.root, kept)})" if kept is not None else "no checkpoint was kept"
            raise RunFault(f"saving iteration {state.iteration} to {self.root} failed ({failed}{_free_space(self.root)}); its partial files "
                           f"were removed and {where}; free space or fix the cause, then rerun the same command to resume") from original
        return final

    def _finish(self, tmp: str, final: str, iteration: int) -> None:
        """Rank 0, after every rank has written: side files, the manifest last, rename, latest file."""
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(self.cfg.to_yaml())
        self._copy_hf_assets(tmp)
        manifest.write(tmp, iteration)
        if os.path.isdir(final):  # the same iteration saved again (after a resume)
            shutil.rmtree(final)
        os.rename(tmp, final)
        marker = os.path.join(self.root, LATEST + ".tmp")
        with open(marker, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker, os.path.join(self.root, LATEST))
        self._prune(iteration)

    @staticmethod
    def _shared_failure(fn: Optional[Callable[[], Any]], failed: Optional[BaseException] = None) -> Optional[str]:
        """Run ``fn`` (where given) and return, on every rank, the first rank's failure of this step
        as one line (None if all went well). dist_checkpointing raises its failures on every rank
        but gives the details to rank 0 only, so the lowest failing rank speaks."""
        if failed is None and fn is not None:
            try:
                fn()
            except Exception as e:
                failed = e
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, failure_reason(failed) if failed is not None else None)
        return next((g for g in gathered if g is not None), None)

    def _conversion_metadata(self) -> dict:
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

    def load(self, point: Optional[ResumePoint]) -> Optional[TrainState]:
        """Resume from ``point`` (find_resume); None when there is nothing to resume."""
        from megatron.core import dist_checkpointing

        if point is None:
            return None
        d, root = point.path, self.cfg.load_dir
        try:
            common = dist_checkpointing.load_common_state_dict(d)
        except _failures() as e:
            raise CheckpointError(f"cannot read {d}/common.pt ({failure_reason(e)}); restore it, or resume from an older iteration "
                                  f"by writing its number into {os.path.join(root, LATEST)}") from None
        if not isinstance(common, dict) or "scheduler" not in common or "layout" not in common:
            raise CheckpointError(f"{d} holds model weights only (no optimizer, schedule or data position: a converter's output?), "
                                  f"nothing to resume; start from its weights with checkpoint.pretrained_checkpoint={root} and a "
                                  "checkpoint.load / training.run_dir of the run's own")
        meta = common.get(ckpt_dirs.ATTNEDIT_KEY)
        resume.check_model(meta, d, self.cfg, self.hf_config, pretrained=False)
        layout = common["layout"]
        resume.check_layout(layout, d, root, self.cfg)
        grouped = layout.get("moe_grouped_gemm")
        if grouped is not None and grouped != bool(self.cfg.model.moe_grouped_gemm) and _has_experts(self.models):
            raise ConfigError(
                f"{d} was saved with model.moe_grouped_gemm={str(grouped).lower()} and this run sets "
                f"{str(not grouped).lower()}: the optimizer state cannot move between the two expert layouts; resume with "
                f"model.moe_grouped_gemm={str(grouped).lower()}, or start a new run from its weights with checkpoint.pretrained_checkpoint={root}"
            )
        same_world = layout.get("world_size") == dist.get_world_size()
        _materialize_optimizer_state(self.optimizer)
        sd = _model_sharded_state_dict(self.models)
        sd["optimizer"] = self.optimizer.sharded_state_dict(sd, is_loading=True, metadata=SHARDING)
        if same_world:  # RNG and objective state are per rank: only meaningful on the same world
            sd["rng_state"] = _per_rank("rng_state", None)
            sd["objective_state"] = _per_rank("objective_state", None)
        try:
            loaded = dist_checkpointing.load(sd, d)
            with torch.no_grad():  # fp32 main params are views of the (leaf) model params
                _load_model_state(self.models, loaded)
                self.optimizer.load_state_dict(loaded["optimizer"])
        except _failures() as e:
            raise CheckpointError(f"cannot load {d} ({failure_reason(e)}{resume.option_diff(meta, self.cfg)}); restore it, or resume "
                                  f"from an older iteration by writing its number into {os.path.join(root, LATEST)}") from None
        _unshare_adam_steps(self.optimizer)
        self.scheduler.load_state_dict(common["scheduler"])
        if same_world:
            set_rng_state(self.plat, loaded["rng_state"])
            self.objective.load_state_dict(loaded["objective_state"])
        elif dist.get_rank() == 0:
            print(f"note: {d} was saved on {layout.get('world_size')} ranks, this run has "
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


def _pretrained_iter_dir(path: str) -> str:
    """The iteration directory to take weights from: a save directory's newest complete checkpoint
    (the iterations passed over named in one line), an iteration directory as it is (refused when
    its manifest says it is damaged); anything else is left to the converters' reader."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint.pretrained_checkpoint={path} is not a directory; point it at a megatron checkpoint "
                              "(a run's checkpoints/ directory, one iteration of it, or hf_to_mcore.py's --save-dir)")
    if os.path.isfile(os.path.join(path, LATEST)) and read_latest(path) is not None:
        point = resume.choose(path)
        if point is not None and point.note():
            print(point.note().replace("resuming from", "taking weights from"), file=sys.stderr, flush=True)
        return point.path if point is not None else path
    why = manifest.problem(path) if os.path.isfile(os.path.join(path, manifest.MANIFEST)) else None
    if why:
        raise CheckpointError(f"checkpoint.pretrained_checkpoint={path} is damaged: {why}; point it at another checkpoint")
    return path


def load_model_weights(models, path: str, cfg, hf: dict) -> str:
    """Initialise ``models`` from the model part of a megatron checkpoint (a save directory or one
    iteration directory) written by this loop or by checkpoints_tools/hf_to_mcore.py, after
    checking that it holds the model this run trains (attention target, shapes)."""
    d = on_rank0(lambda: _pretrained_iter_dir(path))
    meta = ckpt_dirs.read_checkpoint_metadata(d)
    resume.check_model(meta, f"checkpoint.pretrained_checkpoint={path}", cfg, hf, pretrained=True)
    try:
        for m in models:
            meta = ckpt_dirs.load_mcore_checkpoint_into_model(_unwrap(m), d)
    except _failures() as e:
        if isinstance(e, errors.UserError):
            raise
        raise CheckpointError(f"cannot load the weights of {d} ({failure_reason(e)}{resume.option_diff(meta, cfg)}); "
                              "point checkpoint.pretrained_checkpoint at a checkpoint of this run's model") from None
    return meta["iter_dir"]
