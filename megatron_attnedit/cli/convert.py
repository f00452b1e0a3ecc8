"""Command lines of the converters: ``attnedit convert | export | gguf`` (and the scripts
``checkpoints_tools/hf_to_mcore.py``, ``mcore_to_hf.py``, ``hf_to_gguf.py``).

User mistakes -- bad config, bad or incomplete input, an output that would clobber something --
and environment faults (disk full, unwritable path) end with one ``error: ...`` line on stderr and
exit status 2, no traceback, nothing written (``errors.run_cli``; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
from typing import Callable, List, Optional

from megatron_attnedit.cli import args
from megatron_attnedit.errors import run_cli
from megatron_attnedit.families import SUPPORTED_MODEL_TYPES


def _free_memory_promptly() -> None:
    """Serve allocations above 1 MiB from mmap (glibc), so a tensor freed after it is written goes
    back to the OS at once. glibc's default threshold adapts upwards to the sizes freed (up to
    32 MiB), after which mid-size tensors are served from the heap, whose freed space RSS keeps:
    a converter streaming hundreds of them would creep upwards. Best effort; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (also stops its dynamic adjustment)
    except (OSError, AttributeError):
        pass


def _interrupt_on_sigterm() -> None:
    # a job scheduler's SIGTERM takes the same clean-up path as Ctrl-C: no partial output left
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _run(ap: argparse.ArgumentParser, argv: Optional[List[str]], convert: Callable[[argparse.Namespace], object],
         allow_pickle: bool = True) -> int:
    """Add the flags every converter has, parse, run ``convert(args)`` under ``run_cli`` and print
    the line of the report it returns."""
    if allow_pickle:
        args.allow_pickle(ap)
    args.progress(ap)
    args.debug(ap)
    a = ap.parse_args(argv)
    _free_memory_promptly()
    _interrupt_on_sigterm()
    out = {}

    def body():
        out["report"] = convert(a)

    rc = run_cli(body, argv, interrupt_message="interrupted; nothing was written")
    if rc == 0:
        print(out["report"].line(), flush=True)
    return rc


def hf_to_mcore_main(argv: Optional[List[str]] = None) -> int:
    ap = args.parser(
        "attnedit convert",
        f"Convert a Hugging Face checkpoint ({', '.join(SUPPORTED_MODEL_TYPES)}) into a megatron-core checkpoint.",
        "  attnedit convert --hf-dir /models/Qwen3-8B --save-dir /ckpt/qwen3-8b --tensor-model-parallel-size 4\n"
        "  attnedit convert --hf-dir /models/Qwen3-30B-A3B --save-dir /ckpt/q30b --ckpt-format torch --expert-model-parallel-size 8\n"
        "  (same as: python checkpoints_tools/hf_to_mcore.py ...)",
    )
    args.hf_dir(ap, "HF model directory (config.json + safetensors)")
    args.output(ap, "megatron save directory (gets iter_0000000/ and latest_checkpointed_iteration.txt)")
    args.parallel(ap)
    ap.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default="torch_dist",
                    help="torch_dist: distributed checkpoint, loads at any TP/PP/EP (default); torch: legacy per-rank files")

    def go(a):
        from megatron_attnedit.convert.converters import hf_to_mcore  # megatron-core: not for --help

        return hf_to_mcore(
            a.hf_dir, a.save_dir, a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size,
            ckpt_format=a.ckpt_format, overwrite=a.overwrite, allow_pickle=a.allow_pickle, progress=not a.no_progress,
        )

    return _run(ap, argv, go)


def mcore_to_hf_main(argv: Optional[List[str]] = None) -> int:
    ap = args.parser(
        "attnedit export",
        "Convert a megatron-core checkpoint (torch_dist or legacy torch, any layout) into a sharded HF safetensors checkpoint. "
        "A student (its metadata names an attention target) is written in its target's format: MLA as DeepSeek-V2 "
        "(stock transformers), GateSWA as its teacher's family plus the model code it needs (trust_remote_code=True).",
        "  attnedit export --load-dir runs/qwen3_8b_mla/stage2/checkpoints --save-dir out/qwen3-8b-mla\n"
        "  attnedit export --load-dir runs/quickstart/mla/stage2/checkpoints --save-dir out/mla --gguf\n"
        "  (same as: python checkpoints_tools/mcore_to_hf.py ...)",
    )
    ap.add_argument("--load-dir", required=True, help="megatron save directory (or one iter_XXXXXXX/ inside it)")
    args.output(ap, "HF output directory")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    args.dtype(ap, "dtype of every tensor written, declared in config.json: auto (default: the dtype the teacher's config declares, "
                   "as stored when it declares none), bfloat16, float16 or float32")
    ap.add_argument("--gguf", action="store_true",
                    help="also write SAVE_DIR/model.gguf for llama.cpp (teacher and MLA students; same dtype as the export)")

    def go(a):
        from megatron_attnedit.convert.converters import mcore_to_hf, parse_dtype  # megatron-core: not for --help

        return mcore_to_hf(a.load_dir, a.save_dir, overwrite=a.overwrite, max_shard_size=a.max_shard_size,
                           dtype=parse_dtype(a.dtype), allow_pickle=a.allow_pickle, progress=not a.no_progress, gguf=a.gguf)

    return _run(ap, argv, go)


def hf_to_gguf_main(argv: Optional[List[str]] = None) -> int:
    ap = args.parser(
        "attnedit gguf",
        "Write a Hugging Face model directory -- the teacher (Qwen3, Qwen3-MoE) or an MLA student exported by "
        "`attnedit export` (DeepSeek-V2) -- as one GGUF file that llama.cpp loads as it is. GateSWA students have no "
        "llama.cpp architecture and are refused.",
        "  attnedit gguf --hf-dir out/qwen3-8b-mla --out out/qwen3-8b-mla.gguf\n  (same as: python checkpoints_tools/hf_to_gguf.py ...)",
    )
    args.hf_dir(ap)
    args.output(ap, "the .gguf file to write", flag="--out")
    args.dtype(ap, "dtype of the weight matrices (norms stay float32, as llama.cpp expects): auto (default: the dtype "
                   "config.json declares), bfloat16, float16 or float32")

    def go(a):
        from megatron_attnedit.convert.gguf_export import hf_to_gguf  # the gguf package: not for --help
        from megatron_attnedit.convert.hf_writer import parse_dtype

        return hf_to_gguf(a.hf_dir, a.out, dtype=parse_dtype(a.dtype), overwrite=a.overwrite, progress=not a.no_progress)

    return _run(ap, argv, go, allow_pickle=False)
