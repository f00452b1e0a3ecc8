"""Reading HF safetensors checkpoints one tensor at a time, and loading them into a megatron shard.

``HFCheckpoint`` opens a model directory (single file or sharded with an index), checks it before
anything is written anywhere (missing shards, truncated files, pickle weights) and hands out
tensors lazily. ``load_into_model`` fills one rank's megatron model (its pipeline stage, TP and
EP shard) from it through a mapping table; every rank reads only the slices it needs.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import safe_open

from megatron_attnedit.convert import checks
from megatron_attnedit.convert.checks import check_finite
from megatron_attnedit.errors import CheckpointError
from megatron_attnedit.families import mapping

INDEX = "model.safetensors.index.json"


def reason(e: BaseException) -> str:
    """What a dependency's exception says, short enough for one line: its first sentence (torch's
    zip reader appends a paragraph of advice about miniz)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = re.split(r"(?<=[a-z)])\. ", text)[0].rstrip(".")
    return text[:200] or type(e).__name__


class HFCheckpoint:
    def __init__(self, hf_dir: str, allow_pickle: bool = False):
        self.dir = hf_dir
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir} is not a directory; --hf-dir must be a Hugging Face model directory")
        self.weight_map: Dict[str, str] = {}
        self._pickle: Optional[Dict[str, torch.Tensor]] = None
        idx = os.path.join(hf_dir, INDEX)
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(idx):
            self.weight_map = _read_index(idx)
        elif os.path.isfile(single):
            self.weight_map = {k: "model.safetensors" for k in _header_keys(single)}
        else:
            bins = sorted(x for x in os.listdir(hf_dir) if x.endswith(".bin") or x.endswith(".pt"))
            if bins and not allow_pickle:
                raise CheckpointError(
                    f"{hf_dir} holds pickle weights ({bins[0]}) which can run arbitrary code when loaded; "
                    "convert them to safetensors or pass --allow-pickle if you trust the source"
                )
            if not bins:
                raise CheckpointError(f"no model.safetensors or {INDEX} in {hf_dir}")
            self._pickle = {}
            for b in bins:
                self._pickle.update(_load_pickle_weights(os.path.join(hf_dir, b)))
            self.weight_map = {k: "<pickle>" for k in self._pickle}
        self._headers: Dict[str, dict] = {}
        self._check_files()

    def _check_files(self) -> None:
        for fname in sorted(set(self.weight_map.values())):
            if fname == "<pickle>":
                continue
            path = os.path.join(self.dir, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"shard {fname} listed in {INDEX} is missing from {self.dir}; re-download or re-copy it")
            self._headers[fname] = _check_safetensors(path)
        for name, fname in self.weight_map.items():
            if fname != "<pickle>" and name not in self._headers[fname]:
                raise CheckpointError(f"{INDEX} places {name} in {fname}, which does not hold it; the index does not match the files")

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def get(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor ``name``; read straight into ``out`` (contiguous, same dtype and shape) if given.
        NaN / Inf values are refused here, where every tensor is read (``checks.check_finite``)."""

        t = self._get(name, out)
        check_finite(t, name, os.path.join(self.dir, self.weight_map[name]) if self._pickle is None else self.dir)
        return t

    def _get(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} not found in {self.dir}; is this the right model family?")
        if self._pickle is not None or self._headers[self.weight_map[name]][name]["dtype"] not in SAFETENSORS_DTYPES:
            if self._pickle is not None:
                t = self._pickle[name]
            else:
                with safe_open(os.path.join(self.dir, self.weight_map[name]), framework="pt") as h:
                    t = h.get_tensor(name)
            return t if out is None else out.copy_(t)
        fname = self.weight_map[name]
        entry = self._headers[fname][name]
        return _read_tensor(os.path.join(self.dir, fname), entry, 8 + self._headers[fname]["__header_len__"], out)

    def info(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        """(dtype, shape) of a tensor, from the file header (no data read)."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} not found in {self.dir}; is this the right model family?")
        if self._pickle is not None:
            t = self._pickle[name]
            return t.dtype, tuple(t.shape)
        entry = self._headers[self.weight_map[name]][name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name} has dtype {entry['dtype']}, which the converter does not handle")
        return SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def nbytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in set(self.weight_map.values()) if f != "<pickle>")


def _header_keys(path: str) -> List[str]:
    return [k for k in _read_header(path) if k != "__metadata__"]


def _read_header(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-download or re-copy it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated (header of {n} bytes in a {size}-byte file); re-download or re-copy it")
        try:
            return json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None


def _read_index(path: str) -> Dict[str, str]:
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a safetensors index (no readable weight_map); re-download or re-copy it") from None
    return dict(weight_map)


def _load_pickle_weights(path: str) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged archive, or objects beyond tensors (weights_only refuses them)
        raise CheckpointError(f"cannot read {path} ({reason(e)}); the file is damaged or not a weights file: re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a mapping of tensor names to tensors; it is not a weights file")
    return state


def _check_safetensors(path: str) -> dict:
    """The header of a complete, self-consistent safetensors file (tensor entries only, plus
    ``__header_len__``): every entry's byte range fits its dtype and shape and lies in the file."""
    header = _read_header(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a mapping); re-download or re-copy it")
    out = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in out.items():
        _check_entry(path, name, entry)
    end = max((v["data_offsets"][1] for v in out.values()), default=0)
    size = os.path.getsize(path)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated ({size} bytes, needs {8 + n + end}); re-download or re-copy it")
    out["__header_len__"] = n
    return out


def _check_entry(path: str, name: str, entry) -> None:
    """One header entry: a dtype, a shape of non-negative ints, and a byte range of that size."""
    damaged = f"{path}: the header entry of {name} is damaged ({{}}); re-download or re-copy the file"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(damaged.format("no dtype / shape / data_offsets"))
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(damaged.format(f"shape {shape!r}"))
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(damaged.format(f"data_offsets {offsets!r}"))
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is not None:
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise CheckpointError(damaged.format(
                f"{offsets[1] - offsets[0]} bytes for shape {tuple(shape)} of {entry['dtype']}, which needs {numel * dtype.itemsize}"))


# safetensors dtype codes (https://github.com/huggingface/safetensors, format description)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_tensor(path: str, entry: dict, data_start: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Read one tensor with a plain file read into a fresh buffer.

    Not through safetensors' mmap: pages of a mapped file count in the process RSS as they are
    touched, so reading a whole checkpoint through the map grows RSS to the checkpoint size; a
    plain read leaves them in the page cache only, and memory stays at one tensor.
    """
    begin, end = entry["data_offsets"]
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
    if out is not None:
        if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}")
        buf = out.view(-1).view(torch.uint8) if out.numel() else torch.empty(0, dtype=torch.uint8)
    else:
        buf = torch.empty(end - begin, dtype=torch.uint8)
    if buf.numel() != end - begin:
        raise CheckpointError(f"{path}: header size of a tensor does not match its dtype and shape; the file is damaged")
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + begin)
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{path} ended early while reading a tensor; re-download or re-copy it")
            got += n
    return out if out is not None else buf.view(dtype).reshape(shape)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def global_name(local: str, layer_offset: int, expert_offset: int) -> str:
    """Local module-state-dict name of this rank -> name with global layer and expert indices."""
    m = _LAYER.match(local)
    if not m:
        return local
    rest = m.group(2)
    e = _EXPERT.match(rest)
    if e:
        rest = f"{e.group(1)}{int(e.group(2)) + expert_offset}{e.group(3)}"
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{rest}"


def rank_offsets(model) -> tuple:
    """(first global layer, first global expert) of this rank's model."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layer_offset = get_transformer_layer_offset(model.config)
    n_exp = model.config.num_moe_experts or 0
    ep = parallel_state.get_expert_model_parallel_world_size()
    expert_offset = parallel_state.get_expert_model_parallel_rank() * (n_exp // ep) if n_exp else 0
    return layer_offset, expert_offset


def trainable_items(model) -> Iterable:
    """(local name, tensor) of the module state dict, without megatron's _extra_state entries; names
    in GPTModel's layout (``models.layers.gpt_layout_name``: a HybridModel's too)."""
    from megatron_attnedit.models.layers import gpt_layout_name

    name = gpt_layout_name(model)
    for k, v in model.state_dict(keep_vars=True).items():
        if k.endswith("_extra_state") or not isinstance(v, torch.Tensor):
            continue
        yield name(k), v


@torch.no_grad()
def load_into_model(model, ckpt: HFCheckpoint, table) -> None:
    """Fill this rank's model from an HF checkpoint through ``table`` (a ModelTable)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    layer_offset, expert_offset = rank_offsets(model)
    tied = bool(table.cfg.get("tie_word_embeddings"))
    for local, param in trainable_items(model):
        name = global_name(local, layer_offset, expert_offset)
        if tied and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        try:
            rule, layer, expert = table.rule_for(name)
        except KeyError:
            raise CheckpointError(f"no conversion rule for megatron parameter {name}") from None
        _, hf_names = rule.format(layer, expert)
        r, s = (etp_rank, etp_size) if rule.expert else (tp_rank, tp_size)
        check_hf_inputs(ckpt, table, rule, hf_names, _unsharded_shape(rule, tuple(param.shape), s))
        full = mapping.to_megatron(rule, [ckpt.get(h) for h in hf_names], table.shapes)
        shard = mapping.tp_shard(rule, full, r, s)
        if tuple(shard.shape) != tuple(param.shape):
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint gives {tuple(shard.shape)}, model has {tuple(param.shape)}; "
                "does config.json match the weights?"
            )
        param.data.copy_(shard.to(param.dtype))


def _unsharded_shape(rule, shard_shape: Tuple[int, ...], tp_size: int) -> Tuple[int, ...]:
    """The whole (TP=1) megatron shape of a parameter whose TP shard has ``shard_shape``."""
    shape = list(shard_shape)
    if tp_size > 1 and rule.tp_split is not None:
        shape[0 if rule.tp_split == "gate_up" else rule.tp_split] *= tp_size
    return tuple(shape)


def check_hf_inputs(ckpt: HFCheckpoint, table, rule, hf_names, megatron_shape: Tuple[int, ...]) -> None:
    """The HF tensors have a weight dtype and the shapes the model's config implies, before they
    are read: a vocab_size that is not the embedding's rows, or a transposed tensor with the right
    number of elements, would otherwise load without a word."""
    for h, want in zip(hf_names, mapping.hf_shapes_of(rule, table.shapes, megatron_shape)):
        dtype, got = ckpt.info(h)
        where = os.path.join(ckpt.dir, ckpt.weight_map[h]) if ckpt._pickle is None else ckpt.dir
        checks.check_dtype(dtype, h, where)
        if rule.transform == "vocab" and len(got) == 2 and got[1:] == tuple(want[1:]) and got[0] != want[0]:
            raise checks.vocab_rows_mismatch(h, where, got[0], table.shapes.vocab_size, os.path.join(ckpt.dir, "config.json"))
        checks.check_shape(got, want, h, where, implied_by="config.json")
