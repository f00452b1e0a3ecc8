"""The megatron side of a conversion, read off a model built on the meta device.

Rather than restating megatron's checkpoint conventions (stacked layers, TE-style norm names,
``[gate; up]`` factories, per-expert stacking, ``_extra_state`` objects), the converters build
the model once at TP=PP=EP=1 on the ``meta`` device -- no memory, no initialisation -- and ask
it: its module state dict gives every parameter by global name and shape; its
``sharded_state_dict()`` gives the exact distributed-checkpoint keys, global shapes and chunk
offsets megatron itself writes and reads. Because the torch_dist format is layout-free, the
TP=1 chunking loads into a model built at any TP/PP/EP (DCP reshards on read).

Each checkpoint chunk is tied back to the parameter it is a view of (storage identity on the
meta device), so a chunk's data is "this slice of that parameter" and can be produced from, or
written into, one parameter at a time.

Needs megatron's parallel state initialised at TP=PP=EP=1 in this process
(``platform.init_platform("cpu")`` + ``platform.init_distributed(plat)``, single process).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

from megatron_attnedit.errors import CheckpointError
from megatron_attnedit.models import builder
from megatron_attnedit.models.layers import gpt_layout_name
from megatron_attnedit.targets.student import build_student


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One distributed-checkpoint chunk: a box of tensor ``key`` that is a view of one parameter."""

    key: str  # DCP fqn (megatron ShardedTensor key)
    global_shape: Tuple[int, ...]  # including megatron's prepended (layer / expert) axes
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]  # (1,) * prepend + local shape
    view: Tuple[Tuple[int, ...], Tuple[int, ...], int]  # (shape, stride, storage offset) in the parameter

    def of(self, param: torch.Tensor) -> torch.Tensor:
        """The chunk as a view of ``param`` (the full TP=1 parameter), in its checkpoint shape."""
        shape, stride, offset = self.view
        return param.as_strided(shape, stride, offset).view(self.sizes)


@dataclasses.dataclass(frozen=True)
class Obj:
    """A megatron ShardedObject (``_extra_state``): stored as bytes under its unique key."""

    unique_key: str
    data: object


@dataclasses.dataclass
class ModelLayout:
    params: Dict[str, Tuple[int, ...]]  # global name -> shape, module state dict order
    extra_state: List[str]  # module state dict names of ``_extra_state`` entries
    chunks: Dict[str, List[Chunk]]  # global parameter name -> its checkpoint chunks
    objects: List[Obj]
    padded_vocab_size: int


def build_meta_model(cfg: dict, padded_vocab: int, target=None):
    """The whole model (one stage, TP=EP=1) on the meta device, for its names and shapes only: the
    teacher's (``builder.build_model``) or, when ``target`` (a TargetConfig) is given, the student's
    (``student.build_student``), with the checkpoint's padded vocabulary (which depends on the TP it
    was padded for)."""
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("the converter's layout needs megatron initialised at TP=PP=1 in a single process")
    opts = builder.BuildOptions(use_cpu_initialization=True, perform_initialization=False)
    if target is None:
        return builder.build_model(cfg, opts, meta_vocab=padded_vocab)
    return build_student(cfg, target, opts, meta_vocab=padded_vocab)


def model_layout(cfg: dict, padded_vocab: int, target=None) -> ModelLayout:
    """The checkpoint layout of the teacher, or of the student of ``target`` (a TargetConfig)."""
    model = build_meta_model(cfg, padded_vocab, target)
    gpt_name = gpt_layout_name(model)  # the tables' names (a HybridModel's modules are per symbol)
    state = {gpt_name(k): v for k, v in model.state_dict(keep_vars=True).items()}
    params = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    extra = [k for k in state if k.endswith("_extra_state")]
    storage_of = {k: v.untyped_storage()._cdata for k, v in state.items() if isinstance(v, torch.Tensor)}

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    chunks: Dict[str, List[Chunk]] = {}
    objects: List[Obj] = []
    for name, value in sharded.items():
        name = gpt_name(name)
        items = value if isinstance(value, list) else [value]
        for sh in items:
            if isinstance(sh, ShardedObject):
                objects.append(Obj(sh.unique_key, sh.data))
                continue
            if not isinstance(sh, ShardedTensor):
                raise CheckpointError(f"unexpected entry {name} ({type(sh).__name__}) in the model's sharded state dict")
            if name not in params or sh.data.untyped_storage()._cdata != storage_of[name]:
                raise CheckpointError(f"checkpoint entry {sh.key} is not a view of parameter {name}; the converter cannot map it")
            d = sh.data
            chunks.setdefault(name, []).append(
                Chunk(
                    key=sh.key,
                    global_shape=tuple(sh.global_shape),
                    offsets=tuple(sh.global_offset),
                    sizes=(1,) * sh.prepend_axis_num + tuple(sh.local_shape),
                    view=(tuple(d.shape), tuple(d.stride()), d.storage_offset()),
                )
            )
    missing = [p for p in params if p not in chunks]
    if missing:
        raise CheckpointError(f"parameters without a checkpoint entry: {', '.join(missing[:5])}")
    return ModelLayout(params=params, extra_state=extra, chunks=chunks, objects=objects, padded_vocab_size=padded_vocab)


def check_table_covers(layout: ModelLayout, table) -> None:
    """Every megatron parameter has a table entry and every table entry a parameter."""
    produced = set(table.megatron_names())
    params = set(layout.params)
    missing, extra = sorted(params - produced), sorted(produced - params)
    if missing:
        raise CheckpointError(f"no conversion rule produces megatron parameter(s) {', '.join(missing[:5])}")
    if extra:
        raise CheckpointError(f"conversion rules name parameter(s) the megatron model does not have: {', '.join(extra[:5])}")


def ordered_params(layout: ModelLayout, table) -> List[Tuple[str, Tuple[str, ...], object]]:
    """(megatron name, hf names, rule) in the model's own state-dict order (embedding, layers, head)."""
    by_name = {m: (m, hf, r) for m, hf, r in table.entries()}
    return [by_name[p] for p in layout.params]
