"""Streaming torch_dist (megatron-core distributed checkpoint) writer and chunk reader.

Writing: the write plan (one item per checkpoint chunk, i.e. per layer of a stacked tensor,
per half of a ``[gate; up]`` fc1, per expert) comes from ``layout.model_layout``; the data of
an item is produced only when the storage writer asks for it (``resolve_data``); the writer
(``_StreamingFileWriter``) resolves, writes and drops items one at a time, so memory holds one
parameter (plus a copy of one chunk when a parameter has several) at a time, never the model.

Reading: one parameter at a time, through DCP's resharding reads (``create_read_items_for_chunk_list``)
straight into a buffer of that parameter -- whatever TP/PP/EP the checkpoint was saved at.

The files are what megatron's ``dist_checkpointing.save`` writes for the same model: the same
keys, global shapes, dtypes and ``ShardedObject`` byte entries; ``metadata.json`` names the
torch_dist backend; ``common.pt`` holds the non-sharded state (args, iteration, our metadata).
"""

from __future__ import annotations

import io
import os
from typing import Callable, Dict, List, Tuple

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_attnedit.convert.checks import check_dtype
from megatron_attnedit.convert.hf_io import reason
from megatron_attnedit.errors import CheckpointError
from megatron_attnedit.convert.layout import Chunk, ModelLayout
from megatron_attnedit.convert.outdir import torch_save


# first components of megatron GPTModel weight keys (anything else -- optimizer., rng_state -- is not model weights)
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")


class _LazySavePlanner(SavePlanner):
    """A save plan given up front; each item's data made on demand by ``resolve``."""

    def __init__(self, items: List[WriteItem], resolve: Callable[[WriteItem], object]):
        self.items = items
        self.resolve = resolve

    def set_up_planner(self, state_dict=None, storage_meta=None, is_coordinator=True) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        return self.resolve(write_item)


class _StreamingFileWriter(dcp.FileSystemWriter):
    """One file, items written in plan order, nothing kept after it is written.

    torch 2.13's FileSystemWriter keeps every tensor it has written in a dict until the file is
    closed (for its safetensors option), which would hold a whole model whose keys are per layer
    (MoE) in memory. This writes each item as ``torch.save`` bytes at the current offset -- the
    same records DCP's reader reads -- and drops it.
    """

    def write_data(self, plan: SavePlan, planner: SavePlanner):
        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
        from torch.distributed.checkpoint.storage import WriteResult
        from torch.futures import Future

        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with open(os.path.join(str(self.path), name), "wb") as f:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = f.tell()
                if item.type == WriteItemType.BYTE_IO:
                    f.write(data.getbuffer())
                else:
                    torch_save(data, f)
                del data
                length = f.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length)))
            f.flush()
            os.fsync(f.fileno())
        fut: Future = Future()
        fut.set_result(results)
        return fut


def _unwrapped(e: BaseException) -> BaseException:
    """DCP wraps what a step raised (our CheckpointError, a disk-full OSError, Ctrl-C) in a
    CheckpointException, a BaseException with the traceback in its text: the error itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException):
        for exc, _ in e.failures.values():
            return exc
    return e


def _chunk_item(c: Chunk, dtype: torch.dtype) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(c.key, torch.Size(c.offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(c.global_shape),
        ),
    )


def _object_bytes(data) -> io.BytesIO:
    # megatron stores the list of this rank's ShardedObject datas under the object's unique key
    buf = io.BytesIO()
    torch.save([data], buf)
    buf.seek(0)
    return buf


def write(
    iter_dir: str,
    layout: ModelLayout,
    order: List[str],
    dtype_of: Callable[[str], torch.dtype],
    materialize: Callable[[str], torch.Tensor],
    common: dict,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Write a torch_dist checkpoint into ``iter_dir``.

    ``order``: parameter names in write order; ``materialize(name)`` returns the full TP=1
    parameter (called once per parameter: chunks of one parameter are consecutive and share it).
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    os.makedirs(iter_dir, exist_ok=True)
    items: List[WriteItem] = []
    source: Dict[Tuple[str, Tuple[int, ...]], Tuple[str, Chunk]] = {}
    objects = {}
    for o in layout.objects:
        items.append(WriteItem(index=MetadataIndex(o.unique_key), type=WriteItemType.BYTE_IO))
        objects[o.unique_key] = o.data
    for name in order:
        for c in layout.chunks[name]:
            items.append(_chunk_item(c, dtype_of(name)))
            source[(c.key, c.offsets)] = (name, c)

    current: Dict[str, torch.Tensor] = {}

    def resolve(item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return _object_bytes(objects[item.index.fqn])
        name, c = source[(item.index.fqn, tuple(item.index.offset))]
        if name not in current:
            current.clear()  # drop the previous parameter before making the next
            current[name] = materialize(name)
        t = c.of(current[name])
        if t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # torch.save would write the view's whole storage
        on_bytes(t.nbytes)
        return t

    from torch.distributed.checkpoint.api import CheckpointException

    writer = _StreamingFileWriter(iter_dir, single_file_per_rank=True, thread_count=1)
    try:
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(items, resolve), no_dist=True)
    except CheckpointException as e:
        raise _unwrapped(e) from None
    current.clear()
    torch_save(common, os.path.join(iter_dir, "common.pt"))
    save_config(CheckpointingConfig("torch_dist", 1), iter_dir)


class _IntoBuffers(LoadPlanner):
    """Reads land directly in caller-provided views (one parameter's chunks)."""

    def __init__(self, targets: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor]):
        self.targets = targets

    def set_up_planner(self, state_dict=None, metadata=None, is_coordinator=True) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise NotImplementedError

    def resolve_tensor(self, read_item) -> torch.Tensor:
        t = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, off, length)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class ChunkReader:
    """Reads parameters of a TP=1 layout out of a torch_dist checkpoint saved at any layout."""

    def __init__(self, iter_dir: str):
        self.reader = dcp.FileSystemReader(iter_dir)
        self.dir = iter_dir
        path = os.path.join(iter_dir, ".metadata")
        if not os.path.isfile(path):
            raise CheckpointError(f"{iter_dir} has no .metadata; the checkpoint is incomplete: re-copy it or save it again")
        try:
            self.metadata = self.reader.read_metadata()
            self.reader.set_up_storage_reader(self.metadata, True)
        except Exception as e:  # a truncated or overwritten pickle: EOFError, UnpicklingError, ...
            raise CheckpointError(f"cannot read {path} ({reason(e)}); the file is damaged: re-copy the checkpoint or save it again") from None
        self.check_files()

    def check_files(self) -> None:
        """Every stored record lies inside its file: a truncated or missing .distcp is named before
        anything is read or written."""
        sizes: Dict[str, int] = {}
        self._file_of_key: Dict[str, str] = {}
        for index, info in self.metadata.storage_data.items():
            path = os.path.join(self.dir, info.relative_path)
            self._file_of_key.setdefault(index.fqn, path)
            if path not in sizes:
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: re-copy it or save it again")
                sizes[path] = os.path.getsize(path)
            if info.offset + info.length > sizes[path]:
                raise CheckpointError(
                    f"{path} is truncated ({sizes[path]} bytes, {index.fqn} needs {info.offset + info.length}); "
                    "re-copy the checkpoint or save it again"
                )

    def file_of(self, chunks: List[Chunk]) -> str:
        """The file holding (the first stored chunk of) a parameter, for messages."""
        return self._file_of_key.get(chunks[0].key, self.dir)

    def check(self, layout: ModelLayout) -> None:
        """Every chunk's key is in the checkpoint with the global shape the model expects."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = self.metadata.state_dict_metadata
        for name, chunks in layout.chunks.items():
            for c in chunks:
                m = md.get(c.key)
                if not isinstance(m, TensorStorageMetadata):
                    raise CheckpointError(f"{self.dir} has no tensor {c.key} (for {name}); it does not match its own config")
                if tuple(m.size) != c.global_shape:
                    raise CheckpointError(
                        f"{c.key} in {self.dir} has shape {tuple(m.size)}, the model expects {c.global_shape}; "
                        "does the stored config match the weights?"
                    )
                check_dtype(m.properties.dtype, c.key, self.dir)

    def check_no_leftovers(self, layout: ModelLayout) -> None:
        """Model-weight entries in the checkpoint that no parameter reads mean a config mismatch.
        (Optimizer and RNG entries of a training checkpoint are not model weights and are ignored.)"""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        used = {c.key for cs in layout.chunks.values() for c in cs}
        left = [k for k, m in self.metadata.state_dict_metadata.items()
                if isinstance(m, TensorStorageMetadata) and k not in used and k.startswith(MODEL_PREFIXES)]
        if left:
            raise CheckpointError(f"{self.dir} holds {', '.join(sorted(left)[:3])}, which the model from its config does not have; does the config match?")

    def dtype(self, chunks: List[Chunk]) -> torch.dtype:
        return self.metadata.state_dict_metadata[chunks[0].key].properties.dtype

    def _stored_as_is(self, c: Chunk, shape: Tuple[int, ...]):
        """Index of the stored chunk that is exactly ``c``, when ``c`` is the whole parameter."""
        whole = c.view == (tuple(shape), tuple(torch.empty(shape, device="meta").stride()), 0)
        if not whole:
            return None
        for i, sc in enumerate(self.metadata.state_dict_metadata[c.key].chunks):
            if tuple(sc.offsets) == c.offsets and tuple(sc.sizes) == c.sizes:
                return i
        return None

    def _load_stored(self, key: str, offsets: Tuple[int, ...], i: int) -> torch.Tensor:
        from torch.distributed.checkpoint.utils import _create_file_view

        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(offsets), i)]
        path = os.path.join(self.dir, info.relative_path)
        with open(path, "rb") as f:
            try:
                t = torch.load(_create_file_view(f, info.offset, info.length), map_location="cpu", weights_only=True)
            except Exception as e:  # damaged bytes: PytorchStreamReader / unpickling errors
                raise CheckpointError(f"cannot read {key} from {path} ({reason(e)}); the file is damaged: re-copy the checkpoint or save it again") from None
        md = self.metadata.state_dict_metadata[key]
        sizes = tuple(md.chunks[i].sizes)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path} holds a {type(t).__name__} where {key} should be; the file is damaged: re-copy the checkpoint or save it again")
        if tuple(t.shape) != sizes or t.dtype != md.properties.dtype:
            raise CheckpointError(
                f"{key} in {path} is stored as {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}, its metadata says "
                f"{sizes} {str(md.properties.dtype).replace('torch.', '')}{' (transposed)' if tuple(t.shape) == sizes[::-1] else ''}; "
                "the file is damaged: re-copy the checkpoint or save it again"
            )
        return t

    def read(self, chunks: List[Chunk], shape: Tuple[int, ...]) -> torch.Tensor:
        """The full TP=1 parameter. A parameter stored as one chunk (the usual case for what the
        converter wrote) is loaded as is -- one copy in memory; otherwise chunks are read into a
        buffer through DCP's resharding reads."""
        if len(chunks) == 1:
            i = self._stored_as_is(chunks[0], shape)
            if i is not None:
                return self._load_stored(chunks[0].key, chunks[0].offsets, i).view(shape)
        full = torch.empty(shape, dtype=self.dtype(chunks))
        items, targets = [], {}
        for c in chunks:
            targets[(c.key, c.offsets)] = c.of(full)
            local = ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))
            items += create_read_items_for_chunk_list(c.key, self.metadata.state_dict_metadata[c.key], [local])
        covered = sum(torch.Size(i.lengths).numel() for i in items)
        if covered != full.numel():
            raise CheckpointError(f"{chunks[0].key} in {self.dir} does not cover the whole tensor; the checkpoint is incomplete")
        plan = self.reader.prepare_local_plan(LoadPlan(items))
        try:
            self.reader.read_data(plan, _IntoBuffers(targets)).wait()
        except Exception as e:  # damaged bytes, or a stored chunk whose shape is not its metadata's
            files = sorted({os.path.join(self.dir, self.metadata.storage_data[i.storage_index].relative_path) for i in items})
            raise CheckpointError(f"cannot read {chunks[0].key} from {', '.join(files)} ({reason(e)}); the file is damaged: "
                                  "re-copy the checkpoint or save it again") from None
        return full
