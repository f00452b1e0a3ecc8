"""Streaming writer of sharded Hugging Face safetensors checkpoints.

The list of tensors (name, shape, dtype) is known before any data is read -- shapes come from
the mapping table applied to meta tensors -- so shards are planned up front, each shard's
header is written exactly once, and tensors are appended as they are produced. Memory holds one
tensor at a time; no whole-shard buffer as ``safetensors.torch.save_file`` would need.

Output: ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (always, even
for one shard), as ``save_pretrained`` writes for sharded checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_attnedit.convert.checkpoint import HF_ASSET_FILES
from megatron_attnedit.convert.hf_io import INDEX, SAFETENSORS_DTYPES
from megatron_attnedit.errors import CheckpointError, UserError

_DTYPE_CODE = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DEFAULT_MAX_SHARD = "5GB"


def parse_size(s: str) -> int:
    """'5GB' -> 5e9, '20KB' -> 2e4, '2GiB' -> 2 * 2**30, '1000' -> 1000 (as transformers reads them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(s), flags=re.I)
    if not m:
        raise UserError(f"cannot read --max-shard-size {s!r}; use e.g. 5GB, 500MB, 2GiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    size = int(num * (1024 if binary else 1000) ** power)
    if size <= 0:
        raise UserError(f"--max-shard-size {s!r} is not a positive size; use e.g. 5GB, 500MB, 2GiB")
    return size


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in plan order, into size-limited safetensors shards."""

    def __init__(self, out_dir: str, plan: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.dir = out_dir
        self.plan = list(plan)
        shards: List[List[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(self.plan):
            if dtype not in _DTYPE_CODE:
                raise ValueError(f"dtype {dtype} cannot be written to safetensors")
            n = _nbytes(shape, dtype)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += n
        self.shards = shards
        count = len(shards)
        self.file_of = {}
        for s, idx in enumerate(shards):
            for i in idx:
                self.file_of[i] = f"model-{s + 1:05d}-of-{count:05d}.safetensors"
        self.next = 0
        self._f = None
        self._remaining = 0
        self.total = sum(_nbytes(sh, dt) for _, sh, dt in self.plan)

    def _open_shard(self, first: int) -> None:
        s = next(k for k, idx in enumerate(self.shards) if idx[0] == first)
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for i in self.shards[s]:
            name, shape, dtype = self.plan[i]
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_CODE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)  # data starts 8-byte aligned, as safetensors pads
        self._f = open(os.path.join(self.dir, self.file_of[first]), "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._remaining = len(self.shards[s])

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.plan):
            raise RuntimeError(f"{name}: more tensors than planned")
        want, shape, dtype = self.plan[self.next]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"expected {want} {tuple(shape)} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self._f is None:
            self._open_shard(self.next)
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            self._f.write(memoryview(data.view(torch.uint8).numpy()))
        self.next += 1
        self._remaining -= 1
        if self._remaining == 0:
            self._f.close()
            self._f = None

    def close(self) -> int:
        """Write the index; returns the bytes of tensor data written."""
        if self.next != len(self.plan):
            raise RuntimeError(f"{len(self.plan) - self.next} planned tensors were not written")
        index = {"metadata": {"total_size": self.total}, "weight_map": {n: self.file_of[i] for i, (n, _, _) in enumerate(self.plan)}}
        with open(os.path.join(self.dir, INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        return self.total

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """--dtype: None for auto (the declared dtype), else the torch dtype named."""
    if name in (None, "", "auto"):
        return None
    if name not in _DTYPES:
        raise UserError(f"unknown --dtype {name!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[name]


def declared_dtype(cfg: dict, where: str) -> Optional[torch.dtype]:
    """The dtype a config declares (``dtype``, or ``torch_dtype`` as transformers 4 wrote it);
    None when it declares none."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name is None:
        return None
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise CheckpointError(f"{where}: the stored config declares dtype {name!r}, which cannot be exported; pass --dtype bfloat16, float16 or float32")
    return _DTYPES[name]


def write_hf_config_files(out_dir: str, hf_config: dict, assets_dir: Optional[str], dtype: Optional[torch.dtype]) -> None:
    """config.json (from the checkpoint's metadata), generation_config.json and tokenizer files
    (carried from the source HF directory when the checkpoint has them)."""
    import shutil

    cfg = dict(hf_config)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = name
        if "dtype" not in cfg and "torch_dtype" not in cfg:
            cfg["dtype"] = name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    copied = set()
    if assets_dir:
        for name in HF_ASSET_FILES:
            src = os.path.join(assets_dir, name)
            if name != "config.json" and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
                copied.add(name)
    if "generation_config.json" not in copied:
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        gen["_from_model_config"] = True
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2, sort_keys=True)
            f.write("\n")
