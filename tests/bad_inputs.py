"""Bad inputs and faults, one row each: how to make the input, the command, what must come out.

A row (``Case``) names its tool, a ``make(ws)`` that builds its input under a ``Workspace`` and
returns the paths its argv names (``{placeholders}``), the exit code, and a piece of the one line
stderr must end with. Every row's output location is ``{out}`` (a fresh path unless ``make``
returns one that already exists): after the command it must be unchanged, or absent if it was
absent, and no hidden ``.partial-`` / ``.old-`` sibling may be left beside it.

The converter rows below are walked by ``tests/test_reliability_convert.py``; rows for ``train``,
``export`` and ``evaluate`` can join with the same fields (``tool`` names the runner that starts
them). ``Workspace.sources`` are the good inputs the rows damage: the tiny HF checkpoints of
``conftest.tiny_hf`` and the conversions listed in ``PREREQUISITES``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import struct
from typing import Callable, Dict, Optional, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tool: str  # "hf_to_mcore" | "mcore_to_hf"
    make: Callable[["Workspace", str], Dict[str, str]]  # (workspace, case name) -> {placeholder: path}
    argv: Tuple[str, ...]
    exit_code: int
    fragment: str  # a piece of stderr's last line (which starts with "error: ")
    fsize_limit: Optional[int] = None  # RLIMIT_FSIZE in bytes for the command: a disk that fills up


class Workspace:
    """Where rows build their inputs; ``sources``: name -> a good input to copy and damage."""

    def __init__(self, root: str, sources: Dict[str, str]):
        self.root, self.sources = root, sources

    def path(self, case: str, name: str) -> str:
        os.makedirs(os.path.join(self.root, case), exist_ok=True)
        return os.path.join(self.root, case, name)

    def copy(self, source: str, case: str, name: str = "in") -> str:
        dst = self.path(case, name)
        shutil.copytree(self.sources[source], dst)
        return dst


# Good inputs made by the converters themselves before the rows run (tool, argv with {sources}).
PREREQUISITES = {
    "mcore_dense": ("hf_to_mcore", ["--hf-dir", "{hf_dense}", "--save-dir", "{mcore_dense}", "--no-progress"]),
    "mcore_legacy_tp2": ("hf_to_mcore", ["--hf-dir", "{hf_dense}", "--save-dir", "{mcore_legacy_tp2}", "--ckpt-format", "torch",
                                         "--tensor-model-parallel-size", "2", "--no-progress"]),
    "hf_export": ("mcore_to_hf", ["--load-dir", "{mcore_dense}", "--save-dir", "{hf_export}", "--no-progress"]),
}


# --------------------------------------------------------------------------------------------
# Damaging files
# --------------------------------------------------------------------------------------------


def edit_config(d: str, **kw) -> None:
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))


def edit_safetensors(d: str, fn: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    p = os.path.join(d, "model.safetensors")
    tensors = load_file(p)
    fn(tensors)
    save_file(tensors, p, metadata={"format": "pt"})


def edit_safetensors_header(d: str, fn: Callable[[dict], None]) -> None:
    """Change the header in place, same length: the file still parses, its bytes stay where they were."""
    p = os.path.join(d, "model.safetensors")
    raw = bytearray(open(p, "rb").read())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n, "the edited header must not grow"
    raw[8 : 8 + n] = new + b" " * (n - len(new))
    open(p, "wb").write(bytes(raw))


def poke_safetensors_data(d: str, name: str, data: bytes) -> None:
    """Overwrite the first bytes of tensor ``name``'s data: corrupt bytes that still parse."""
    p = os.path.join(d, "model.safetensors")
    raw = bytearray(open(p, "rb").read())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8 : 8 + n])[name]["data_offsets"][0]
    raw[8 + n + begin : 8 + n + begin + len(data)] = data
    open(p, "wb").write(bytes(raw))


def truncate(path: str, fraction: float) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


def iter_dir(save_dir: str) -> str:
    return os.path.join(save_dir, "iter_0000000")


def rewrite_distcp(save_dir: str, key_part: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rewrite the torch_dist records so that the chunk(s) whose key contains ``key_part`` hold
    ``fn(chunk)``: the file and its .metadata stay consistent with each other (offsets, lengths),
    only the stored tensor differs from what the metadata describes."""
    d = iter_dir(save_dir)
    meta_path = os.path.join(d, ".metadata")
    meta = pickle.load(open(meta_path, "rb"))
    items = sorted(meta.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset))
    files: Dict[str, io.BytesIO] = {}
    hit = False
    for index, info in items:
        raw = open(os.path.join(d, info.relative_path), "rb").read()[info.offset : info.offset + info.length]
        if key_part in index.fqn:
            buf = io.BytesIO()
            torch.save(fn(torch.load(io.BytesIO(raw), weights_only=True)), buf)
            raw, hit = buf.getvalue(), True
        out = files.setdefault(info.relative_path, io.BytesIO())
        meta.storage_data[index] = dataclasses.replace(info, offset=out.tell(), length=len(raw))
        out.write(raw)
    assert hit, key_part
    for rel, buf in files.items():
        open(os.path.join(d, rel), "wb").write(buf.getvalue())
    pickle.dump(meta, open(meta_path, "wb"))


def edit_common(save_dir: str, fn: Callable[[dict], None]) -> None:
    p = os.path.join(iter_dir(save_dir), "common.pt")
    state = torch.load(p, weights_only=True)
    fn(state)
    torch.save(state, p)


def edit_legacy_rank(save_dir: str, rank_dir: str, fn: Callable[[dict], None]) -> None:
    p = os.path.join(iter_dir(save_dir), rank_dir, "model_optim_rng.pt")
    state = torch.load(p, weights_only=False)  # our own test file; it holds an argparse.Namespace
    fn(state["model"])
    torch.save(state, p)


def _set(d: dict, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    d[key] = fn(d[key])


def _nan_at(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = float("nan")
    return t


# --------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------

H2M = ("--hf-dir", "{in}", "--save-dir", "{out}", "--no-progress")
M2H = ("--load-dir", "{in}", "--save-dir", "{out}", "--no-progress")
K_PROJ = "model.layers.1.self_attn.k_proj.weight"
UP_PROJ = "model.layers.2.mlp.up_proj.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"  # torch_dist key: layers stacked along a first axis
FC1_LOCAL = "decoder.layers.1.mlp.linear_fc1.weight"  # a TP=2 shard of [gate; up]: (128, 64), not square


def _hf(edit: Callable[[str], None], source: str = "hf_dense") -> Callable[[Workspace], Dict[str, str]]:
    def make(ws: Workspace, case: str) -> Dict[str, str]:
        d = ws.copy(source, case)
        edit(d)
        return {"in": d}

    return make


def _mc(edit: Callable[[str], None], source: str = "mcore_dense") -> Callable[[Workspace], Dict[str, str]]:
    return _hf(edit, source)


def _existing_out(source: str, edit: Callable[[str], None], input_source: str = "hf_dense"):
    """An output location that already holds something (``edit`` adds what is in the way)."""

    def make(ws: Workspace, case: str) -> Dict[str, str]:
        out = ws.copy(source, case, "out")
        edit(out)
        return {"in": ws.sources[input_source], "out": out}

    return make


def _plain(**paths: str):
    def make(ws: Workspace, case: str) -> Dict[str, str]:
        return {k: (ws.sources[v] if v in ws.sources else v.format(case=ws.path(case, ""))) for k, v in paths.items()}

    return make


def _file_in_the_way(ws: Workspace, case: str) -> Dict[str, str]:
    f = ws.path(case, "a_file")
    open(f, "w").write("not a directory\n")
    return {"in": ws.sources["hf_dense"], "out": os.path.join(f, "out")}


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(text)


def _drop(path: str) -> None:
    if os.path.exists(path):  # (absent from outputs of the converters before manifests)
        os.remove(path)


CONVERTER_CASES = [
    # --- HF input: the config and the weights disagree ---------------------------------------
    Case("hf-vocab-smaller-than-embedding", "hf_to_mcore", _hf(lambda d: edit_config(d, vocab_size=200)), H2M, 2, "would drop 56 vocabulary rows"),
    Case("hf-vocab-larger-than-embedding", "hf_to_mcore", _hf(lambda d: edit_config(d, vocab_size=300)), H2M, 2, "would add 44 vocabulary rows"),
    Case("hf-tensor-transposed", "hf_to_mcore", _hf(lambda d: edit_safetensors(d, lambda t: _set(t, K_PROJ, lambda x: x.t().contiguous()))),
         H2M, 2, f"{K_PROJ} in"),
    Case("hf-tensor-wrong-shape", "hf_to_mcore", _hf(lambda d: edit_safetensors(d, lambda t: _set(t, UP_PROJ, lambda x: x[:100].contiguous()))),
         H2M, 2, "has shape (100, 64), config.json implies (128, 64)"),
    Case("hf-header-shape-swapped", "hf_to_mcore",
         _hf(lambda d: edit_safetensors_header(d, lambda h: h[K_PROJ].update(shape=h[K_PROJ]["shape"][::-1]))), H2M, 2, "stored transposed"),
    Case("hf-header-offsets-lie", "hf_to_mcore",
         _hf(lambda d: edit_safetensors_header(d, lambda h: h[UP_PROJ].update(shape=[127, 64]))), H2M, 2, "header entry of " + UP_PROJ),
    Case("hf-header-garbage", "hf_to_mcore", _hf(lambda d: _poke_file(os.path.join(d, "model.safetensors"), 8, b"{" + b"x" * 30)), H2M, 2,
         "not a safetensors file"),
    Case("hf-truncated", "hf_to_mcore", _hf(lambda d: truncate(os.path.join(d, "model.safetensors"), 0.6)), H2M, 2, "truncated"),
    Case("hf-index-garbage", "hf_to_mcore", _hf(lambda d: _write(os.path.join(d, "model.safetensors.index.json"), "{\"weight_map\": [1, 2")),
         H2M, 2, "not a safetensors index"),
    # --- HF input: values and dtypes that cannot be weights -----------------------------------
    Case("hf-nan-weight", "hf_to_mcore", _hf(lambda d: edit_safetensors(d, lambda t: _set(t, UP_PROJ, lambda x: _nan_at(x, (3, 5))))),
         H2M, 2, "non-finite value(s) (nan at [3, 5])"),
    Case("hf-nan-bytes", "hf_to_mcore", _hf(lambda d: poke_safetensors_data(d, "model.norm.weight", b"\xff" * 8)), H2M, 2,
         "model.norm.weight in"),
    Case("hf-inf-weight", "hf_to_mcore",
         _hf(lambda d: edit_safetensors(d, lambda t: _set(t, "model.norm.weight", lambda x: x.index_fill(0, torch.tensor([7]), float("inf"))))),
         H2M, 2, "(inf at [7])"),
    Case("hf-integer-weight", "hf_to_mcore",
         _hf(lambda d: edit_safetensors(d, lambda t: _set(t, "model.norm.weight", lambda x: x.to(torch.int32)))), H2M, 2, "dtype int32"),
    # --- megatron input (torch_dist) ------------------------------------------------------
    Case("mc-distcp-truncated", "mcore_to_hf", _mc(lambda d: truncate(os.path.join(iter_dir(d), "__0_0.distcp"), 0.5)), M2H, 2,
         "__0_0.distcp is truncated"),
    Case("mc-distcp-nan-bytes", "mcore_to_hf", _mc(lambda d: rewrite_distcp(d, FC2, lambda t: _nan_at(t, (0, 1, 2))), "mcore_dense"),
         M2H, 2, "non-finite value(s)"),
    Case("mc-distcp-transposed", "mcore_to_hf", _mc(lambda d: rewrite_distcp(d, FC2, lambda t: t[0].t().contiguous().unsqueeze(0))),
         M2H, 2, "the file is damaged"),
    Case("mc-distcp-int", "mcore_to_hf", _mc(lambda d: rewrite_distcp(d, FC2, lambda t: t.to(torch.int32))), M2H, 2, "stored as"),
    Case("mc-common-pt-truncated", "mcore_to_hf", _mc(lambda d: truncate(os.path.join(iter_dir(d), "common.pt"), 0.5)), M2H, 2,
         "common.pt (", ),
    Case("mc-metadata-json-garbage", "mcore_to_hf", _mc(lambda d: _write(os.path.join(iter_dir(d), "metadata.json"), "{sharded_backend")),
         M2H, 2, "metadata.json is damaged"),
    Case("mc-dot-metadata-truncated", "mcore_to_hf", _mc(lambda d: truncate(os.path.join(iter_dir(d), ".metadata"), 0.5)), M2H, 2,
         ".metadata ("),
    Case("mc-dot-metadata-missing", "mcore_to_hf", _mc(lambda d: _drop(os.path.join(iter_dir(d), ".metadata"))), M2H, 2,
         "has no .metadata"),
    Case("mc-vocab-larger-in-metadata", "mcore_to_hf", _mc(lambda d: edit_common(d, lambda s: s["attnedit"]["hf_config"].update(vocab_size=300))),
         M2H, 2, "vocab_size 300, which pads to 384 embedding rows"),
    Case("mc-vocab-smaller-in-metadata", "mcore_to_hf",
         _mc(lambda d: edit_common(d, lambda s: s["attnedit"]["hf_config"].update(vocab_size=200))), M2H, 2, "past the stored config's vocab_size 200"),
    Case("mc-tracker-points-nowhere", "mcore_to_hf", _mc(lambda d: _write(os.path.join(d, "latest_checkpointed_iteration.txt"), "7")), M2H, 2,
         "iter_0000007, which is missing"),
    # --- megatron input (legacy per-rank files, TP=2) -------------------------------------
    Case("mc-legacy-shard-transposed", "mcore_to_hf",
         _mc(lambda d: edit_legacy_rank(d, "mp_rank_01", lambda sd: _set(sd, FC1_LOCAL, lambda x: x.t().contiguous())), "mcore_legacy_tp2"),
         M2H, 2, "stored transposed"),
    Case("mc-legacy-nan", "mcore_to_hf",
         _mc(lambda d: edit_legacy_rank(d, "mp_rank_00", lambda sd: _set(sd, "decoder.final_layernorm.weight", lambda x: _nan_at(x, 3))),
             "mcore_legacy_tp2"), M2H, 2, "decoder.final_layernorm.weight"),
    Case("mc-legacy-truncated", "mcore_to_hf", _mc(lambda d: truncate(os.path.join(iter_dir(d), "mp_rank_01", "model_optim_rng.pt"), 0.5),
                                                   "mcore_legacy_tp2"), M2H, 2, "mp_rank_01/model_optim_rng.pt"),
    # --- the output location ----------------------------------------------------------------
    Case("overwrite-with-foreign-entries", "hf_to_mcore",
         _existing_out("mcore_dense", lambda d: (os.makedirs(os.path.join(d, "iter_0000050")), _write(os.path.join(d, "notes.txt"), "mine\n"))),
         H2M + ("--overwrite",), 2, "also holds iter_0000050, notes.txt"),
    Case("overwrite-with-foreign-file-inside", "hf_to_mcore",
         _existing_out("mcore_dense", lambda d: _write(os.path.join(iter_dir(d), "optimizer_extra.pt"), "x")),
         H2M + ("--overwrite",), 2, "iter_0000000/optimizer_extra.pt"),
    Case("overwrite-without-manifest", "hf_to_mcore", _existing_out("mcore_dense", lambda d: _drop(os.path.join(d, ".attnedit-manifest.json"))),
         H2M + ("--overwrite",), 2, "did not write"),
    Case("overwrite-other-tools-output", "hf_to_mcore", _existing_out("hf_export", lambda d: None), H2M + ("--overwrite",), 2,
         "holds the output of mcore_to_hf"),
    Case("exists-without-overwrite", "mcore_to_hf", _existing_out("hf_export", lambda d: None, "mcore_dense"), M2H, 2, "pass --overwrite"),
    Case("save-dir-under-a-file", "hf_to_mcore", _file_in_the_way, H2M, 2, "not a directory"),
    Case("hf-dir-missing", "hf_to_mcore", _plain(**{"in": "{case}nowhere"}), H2M, 2, "not found"),
    Case("max-shard-size-garbage", "mcore_to_hf", _plain(**{"in": "mcore_dense"}), M2H + ("--max-shard-size", "lots"), 2,
         "cannot read --max-shard-size 'lots'"),
    Case("max-shard-size-zero", "mcore_to_hf", _plain(**{"in": "mcore_dense"}), M2H + ("--max-shard-size", "0GB"), 2, "not a positive size"),
    # --- faults while writing ---------------------------------------------------------------
    Case("disk-full-hf-to-mcore", "hf_to_mcore", _plain(**{"in": "hf_dense"}), H2M, 2, "file too large", fsize_limit=200_000),
    Case("disk-full-mcore-to-hf", "mcore_to_hf", _plain(**{"in": "mcore_dense"}), M2H, 2, "file too large", fsize_limit=200_000),
    Case("disk-full-legacy", "hf_to_mcore", _plain(**{"in": "hf_dense"}), H2M + ("--ckpt-format", "torch"), 2, "file too large",
         fsize_limit=200_000),
]


def _poke_file(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def build(case: Case, ws: Workspace) -> Dict[str, str]:
    """The case's paths: its inputs, and ``out`` (a fresh path unless the case made one)."""
    paths = case.make(ws, case.name)
    paths.setdefault("out", ws.path(case.name, "out"))
    return paths


def argv_of(case: Case, paths: Dict[str, str]) -> list:
    return [a.format(**paths) for a in case.argv]


def snapshot(path: str) -> Optional[dict]:
    """What a location holds (relative path -> bytes), None if absent: 'unchanged' is equality."""
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return {"": open(path, "rb").read()}
    out = {}
    for root, dirs, files in os.walk(path):
        for n in dirs:
            out[os.path.relpath(os.path.join(root, n), path) + "/"] = b""
        for n in files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def debris_beside(path: str) -> list:
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    return [n for n in os.listdir(parent) if n.startswith(f".{base}.partial-") or n.startswith(f".{base}.old-")]
