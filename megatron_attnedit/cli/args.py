"""Argument groups the command lines share, defined once: the same flag means the same thing in
every command (name, type, default, help)."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "bfloat16", "float16")


def debug(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also ATTNEDIT_DEBUG=1)")


def hf_dir(ap, help: str = "Hugging Face model directory (config.json, safetensors, tokenizer files)", required: bool = True) -> None:
    ap.add_argument("--hf-dir", required=required, help=help)


def output(ap, what: str, flag: str = "--save-dir") -> None:
    """Where a command writes, and whether it may replace its own earlier output there."""
    ap.add_argument(flag, required=True, help=what)
    ap.add_argument("--overwrite", action="store_true", help=f"replace what this tool wrote before at {flag} (nothing else is replaced)")


def progress(ap) -> None:
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def allow_pickle(ap, help: str = "accept pickle files (they can run code when loaded): .bin weights, or objects in common.pt / rank files") -> None:
    ap.add_argument("--allow-pickle", action="store_true", help=help)


def dtype(ap, help: str, choices=None) -> None:
    """--dtype: auto or a torch dtype name (the converters read it with hf_writer.parse_dtype, whose
    error is one line; a command that lists ``choices`` lets argparse refuse the rest)."""
    ap.add_argument("--dtype", default="auto", choices=choices, help=help)


def device(ap, choices=("auto", "cpu", "cuda"), default: str = "auto") -> None:
    ap.add_argument("--device", default=default, choices=choices, help="where the models run (auto: cuda if a GPU is visible)")


def parallel(ap) -> None:
    """Megatron-LM's layout flags."""
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--expert-model-parallel-size", type=int, default=1)


def parser(prog: str, description: str, examples: str = "") -> argparse.ArgumentParser:
    """A command's parser: its description, and examples under --help."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=("examples:\n" + examples) if examples else None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
