"""HF directory -> one GGUF file that llama.cpp loads as it is (teacher and MLA students).

  qwen3        (Qwen3ForCausalLM: the teacher)            -> llama.cpp ``qwen3``
  qwen3_moe    (Qwen3MoeForCausalLM, every layer MoE)     -> llama.cpp ``qwen3moe``
  deepseek_v2  (DeepseekV2ForCausalLM: the MLA students)  -> llama.cpp ``deepseek2`` (its MLA path)
  GateSWA      refused: llama.cpp has no architecture with a per-head output gate, attention
               sinks and a per-layer sliding-window pattern together.

Why written here with the ``gguf`` package (llama.cpp's own writer, pinned with the llama.cpp
the tests build) rather than by driving llama.cpp's ``convert_hf_to_gguf.py``: that script is not
installable (it lives in llama.cpp's source tree, 100+ modules that change every release) and it
gets our students wrong in three places -- it refuses any byte-level vocabulary it does not know
by hash, writes expert-group keys for dense students (the loader then asserts) and omits
``q_lora_rank`` for full-rank queries (the loader then stops unless the layer count is
DeepSeek-V2-Lite's). Correcting its output would mean patching GGUF metadata after the fact for
every release. What we write instead is small and declarative: tensor names come from the
``gguf`` package's own name tables (the ones llama.cpp's converter uses), the few layout facts
(kv_b_proj split into per-head k_b (transposed) and v_b; merged expert tensors) follow the loader
in llama.cpp's ``src/models/deepseek2.cpp``, and the tests load every GGUF in the pinned
llama.cpp and compare its logits, tokens and cached decode with transformers.

Tensor dtypes: 1-D tensors, norms and the router stay float32 (what llama.cpp's kernels expect,
as its converter does); every other tensor is written in the file's dtype -- by default the one
config.json declares -- and ``general.file_type`` says which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import List, Optional

import torch

from megatron_attnedit.convert import gguf_layouts, gguf_vocab, outdir
from megatron_attnedit.convert.gguf_layouts import Planned
from megatron_attnedit.convert.hf_io import HFCheckpoint
from megatron_attnedit.convert.hf_writer import declared_dtype
from megatron_attnedit.errors import CheckpointError

TOOL = "hf_to_gguf"
GGUF_NAME = "model.gguf"  # what mcore_to_hf --gguf writes into its export
GATESWA_TYPES = ("qwen3_gateswa", "qwen3_moe_gateswa")
GATESWA_REFUSAL = (
    "llama.cpp has no architecture for GateSWA students: none combines a per-head sigmoid output gate, attention sinks "
    "and a per-layer sliding-window pattern (gpt-oss has sinks and alternating windows but no output gate or qk-norm; "
    "Gemma 3 has the window pattern but neither gate nor sinks); serve them with transformers (trust_remote_code=True)"
)


@dataclasses.dataclass
class Report:
    out: str
    arch: str
    dtype: torch.dtype
    tokenizer: str
    bytes_written: int
    seconds: float

    def line(self) -> str:
        return (f"hf_to_gguf: wrote {self.bytes_written / 1e9:.3f} GB to {self.out} (llama.cpp {self.arch}, "
                f"{str(self.dtype).replace('torch.', '')} weights, {self.tokenizer} tokenizer) in {self.seconds:.2f} s")


def file_type(dtype: torch.dtype):
    import gguf

    return {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
            torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[dtype]


def load_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{hf_dir} has no config.json; --hf-dir must be a Hugging Face model directory") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-copy it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; re-copy it")
    return cfg


def check_gguf_supported(cfg: dict, where: str, tokenizer_dir: Optional[str] = None) -> None:
    """One line for what llama.cpp cannot run, before anything is read or written; with
    ``tokenizer_dir``, also that it holds a tokenizer to put in the GGUF."""

    mt = cfg.get("model_type")
    if mt in GATESWA_TYPES:
        raise CheckpointError(f"{where} is a GateSWA student, which has no GGUF export: {GATESWA_REFUSAL}")
    if mt not in gguf_layouts.LAYOUTS:
        raise CheckpointError(f"{where} has model_type {mt!r}; the GGUF export handles {', '.join(gguf_layouts.LAYOUTS)}")
    gguf_layouts.LAYOUTS[mt].check(cfg, where)
    if tokenizer_dir is not None and not gguf_vocab.has_tokenizer(tokenizer_dir):
        raise CheckpointError(f"{where} carries no tokenizer (tokenizer.model or tokenizer.json), which a GGUF needs; "
                              "export without --gguf, add the teacher's tokenizer files to the export, then run hf_to_gguf.py")


def hf_to_gguf(hf_dir: str, out: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False,
               progress: bool = True, inside_export: Optional[str] = None) -> Report:
    """Write ``out`` (one .gguf file) from the HF directory ``hf_dir``; ``dtype`` None: the dtype
    config.json declares (the stored one when it declares none). ``inside_export``: the final path
    of the export being written into ``hf_dir`` (``mcore_to_hf --gguf``: the GGUF goes into the
    export, atomic with it)."""

    t0 = time.time()
    cfg = load_config(hf_dir)
    check_gguf_supported(cfg, hf_dir, tokenizer_dir=hf_dir)
    if inside_export is None:
        for note in outdir.sweep_stale(out):
            print(f"note: {note}", file=sys.stderr, flush=True)
        outdir.check_output_file(out, overwrite, TOOL, sources=[hf_dir])
    layout = gguf_layouts.LAYOUTS[cfg["model_type"]]
    ckpt = HFCheckpoint(hf_dir)
    dtype = dtype or declared_dtype(cfg, hf_dir) or ckpt.info("model.embed_tokens.weight")[0]
    plan = layout.plan(cfg, ckpt, dtype, hf_dir)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its writer logs every step at INFO/WARNING

    model_name = os.path.basename(os.path.normpath(inside_export or hf_dir))

    def write(path: str) -> str:
        return _write(path, layout, cfg, plan, hf_dir, model_name, dtype, progress)

    if inside_export is not None:
        kind = write(out)
    else:
        with outdir.atomic_output_file(out, TOOL) as tmp:
            kind = write(tmp)
        parent = os.path.dirname(os.path.abspath(out))
        if outdir.read_manifest(parent) is not None:  # a GGUF beside an export: --overwrite of the export replaces it
            outdir.add_to_manifest(parent, [os.path.basename(out)], by=TOOL)
    return Report(out, layout.arch_name, dtype, kind, os.path.getsize(out), time.time() - t0)


def _write(path: str, layout, cfg: dict, plan: List[Planned], hf_dir: str, model_name: str, dtype: torch.dtype, progress: bool) -> str:
    import gguf
    from tqdm import tqdm

    w = gguf.GGUFWriter(path, layout.arch_name)
    w.add_name(model_name)
    w.add_file_type(file_type(dtype))
    layout.add_hparams(w, cfg)
    kind = gguf_vocab.add_tokenizer(w, hf_dir, int(cfg["vocab_size"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plan:
        qtype = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
                 torch.bfloat16: gguf.GGMLQuantizationType.BF16}[p.dtype]
        numel = 1
        for d in p.shape:
            numel *= d
        # a dtype numpy lacks (bfloat16) goes in as raw bytes; the shape is given in elements
        w.add_tensor_info(p.name, p.shape, _np_dtype(p.dtype), numel * p.dtype.itemsize, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(_numel(p.shape) * p.dtype.itemsize for p in plan)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=TOOL, disable=not progress, dynamic_ncols=True) as bar:
            for p in plan:
                t = p.make().to(p.dtype).contiguous()
                if tuple(t.shape) != tuple(p.shape):
                    raise RuntimeError(f"{p.name}: made {tuple(t.shape)}, planned {p.shape}")
                w.write_tensor_data(t.view(_VIEW[p.dtype]).numpy() if p.dtype in _VIEW else t.numpy())
                bar.update(t.numel() * t.element_size())
                del t
    finally:
        w.close()
    return kind


_VIEW = {torch.bfloat16: torch.int16}


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    # any dtype but uint8 makes the writer take the shape as elements (uint8 means bytes of a quantized type)
    return {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}[dtype]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
