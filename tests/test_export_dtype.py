"""Exports write the dtype their config.json declares (checkpoints_tools/mcore_to_hf.py).

Checkpoints are stored in float32, as training saves them, under teacher configs that declare
bfloat16 (the bundled teacher does): the export writes bfloat16 and says so; ``--dtype float16``
writes and declares float16; a config that declares nothing gets the stored dtype, declared. An
8B-shape MLA student (Qwen3-8B's widths, the 8B recipe's MLA options; 2 layers, a 4,096-row
vocabulary: see tests/workers/export_dtype.py) writes exactly parameters x 2 bytes of tensor data,
plus the safetensors headers. Every tensor of every export is read from the file headers.
"""

import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import ROOT

SIZES = {"BF16": 2, "F16": 2, "F32": 4}
CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    w = tmp_path_factory.mktemp("export_dtype")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "export_dtype.py"), str(w)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return w, json.load(open(w / "result.json"))


def safetensors_headers(hf_dir):
    """{file: (header bytes incl. its 8-byte length, {tensor: (dtype, shape)})} of an export."""
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            with open(os.path.join(hf_dir, f), "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            out[f] = (8 + n, {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return out


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def check_every_tensor(hf_dir):
    """Every tensor's dtype is the one config.json declares; returns (declared, tensors)."""
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    declared = cfg.get("dtype") or cfg.get("torch_dtype")
    tensors = {k: v for _, (_, t) in safetensors_headers(hf_dir).items() for k, v in t.items()}
    wrong = {k: d for k, (d, _) in tensors.items() if d != CODES[declared]}
    assert not wrong, f"{hf_dir}: config.json declares {declared}, tensors {dict(list(wrong.items())[:3])}"
    return declared, tensors


@pytest.mark.parametrize("name,declared", [("small-teacher", "bfloat16"), ("small-mla", "bfloat16"), ("small-gateswa", "bfloat16"),
                                           ("small-mla-undeclared", "float32"), ("small-mla-fp16", "float16"),
                                           ("qwen3-8b-mla", "bfloat16")])
def test_every_tensor_is_the_declared_dtype(exports, name, declared):
    w, result = exports
    assert result[name]["rc"] == 0, result[name]
    got, _ = check_every_tensor(str(w / "out" / name))
    assert got == declared


def test_8b_shape_mla_export_bytes_are_parameters_times_dtype_size(exports):
    w, result = exports
    hf = str(w / "out" / "qwen3-8b-mla")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["intermediate_size"]) == (4096, 32, 512, 64, 12288)
    headers = safetensors_headers(hf)
    params = sum(numel(s) for _, (_, t) in headers.items() for _, s in t.values())
    assert params == result["qwen3-8b-mla"]["params"]  # the export holds exactly the student's parameters
    assert params > 400_000_000
    files = sum(os.path.getsize(os.path.join(hf, f)) for f in headers)
    assert files == params * SIZES["BF16"] + sum(h for h, _ in headers.values())
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == params * SIZES["BF16"]
    # the 8B shapes themselves (first layer)
    t = {k: s for _, (_, tt) in headers.items() for k, (_, s) in tt.items()}
    a = "model.layers.0.self_attn."
    assert t[a + "q_proj.weight"] == (32 * 192, 4096) and t[a + "kv_a_proj_with_mqa.weight"] == (576, 4096)
    assert t[a + "kv_b_proj.weight"] == (32 * 256, 512) and t[a + "o_proj.weight"] == (4096, 4096)
    assert t["model.layers.0.mlp.down_proj.weight"] == (4096, 12288)
