"""``attnedit``: one command for everything the project does.

  attnedit convert     HF checkpoint -> megatron-core checkpoint          (checkpoints_tools/hf_to_mcore.py)
  attnedit export      megatron checkpoint -> HF (students in their target's format), --gguf too  (mcore_to_hf.py)
  attnedit gguf        HF directory -> one GGUF file for llama.cpp        (checkpoints_tools/hf_to_gguf.py)
  attnedit preprocess  text -> megatron indexed dataset                   (checkpoints_tools/preprocess_data.py)
  attnedit train       a recipe: lm, stage1, stage2                       (python -m megatron_attnedit.train)
  attnedit distill     stage 1 or 2 of a recipe: `attnedit distill 1 qwen3_8b_mla` = train --recipe ... --stage stage1
  attnedit evaluate    teacher and students: perplexity, loss by position, retrieval, decode and KV measured
  attnedit kv-report   KV-cache bytes of a target against the teacher's, from the shapes
  attnedit bench       the training benchmark (launch/bench.py; a checkout's launch/ is needed)
  attnedit quickstart  the main job on the bundled teacher
  attnedit teacher     the bundled teachers: corpus, data sets, a random-init config, held-out loss, model card

``attnedit <command> --help`` shows each command's flags and examples. Several processes:
``torchrun ... -m megatron_attnedit.cli train ...`` (launch/pretrain.sh and distill.sh run the same
entry through its shim, ``-m megatron_attnedit.train``).
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# command -> (module:function taking argv, one line). Imported when the command runs: --help of
# the whole tool must not wait for torch and megatron-core.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "convert": ("megatron_attnedit.cli.convert:hf_to_mcore_main", "HF checkpoint -> megatron-core checkpoint (any TP/PP/EP; torch_dist or legacy)"),
    "export": ("megatron_attnedit.cli.convert:mcore_to_hf_main", "megatron checkpoint -> HF (a student in its target's format); --gguf"),
    "gguf": ("megatron_attnedit.cli.convert:hf_to_gguf_main", "HF directory -> one GGUF file for llama.cpp"),
    "preprocess": ("megatron_attnedit.cli.preprocess:main", "text / jsonl -> megatron indexed dataset with the model's tokenizer"),
    "train": ("megatron_attnedit.cli.train:main", "train a recipe (objective lm, stage1, stage2): --recipe R [--stage S] [--set k=v]"),
    "distill": ("megatron_attnedit.cli.main:distill_main", "stage 1 or 2 of a recipe: attnedit distill 1|2 RECIPE [--set k=v ...]"),
    "evaluate": ("megatron_attnedit.cli.evaluate:main", "evaluate a teacher and its students on held-out data"),
    "kv-report": ("megatron_attnedit.cli.kv_report:main", "KV-cache bytes of a target against the teacher's"),
    "bench": ("megatron_attnedit.cli.main:bench_main", "the training benchmark: tokens/s, TFLOP/s, memory per stage (launch/bench.py)"),
    "quickstart": ("megatron_attnedit.cli.quickstart:main", "the main job on the bundled teacher (--quick: a few steps each)"),
    "teacher": ("megatron_attnedit.teacher:main", "the bundled teachers: data | datasets | init | card | eval"),
}


def _function(spec: str) -> Callable[[Optional[List[str]]], int]:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def distill_main(argv: Optional[List[str]] = None) -> int:
    """``attnedit distill STAGE RECIPE [train flags]`` = ``attnedit train --recipe RECIPE --stage stageSTAGE ...``."""
    argv = list(sys.argv[2:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("1", "2") or argv[0].startswith("-"):
        print("usage: attnedit distill 1|2 RECIPE [--set section.key=value ...] [--debug]\n"
              "  attnedit distill 1 tiny_mla --set model.hf_dir=runs/tiny_teacher/hf data.data_path=[data/stdlib/train]\n"
              "  attnedit distill 2 tiny_mla ...   (stage 2 starts from stage 1's checkpoints: the recipe's pretrained_checkpoint)",
              file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return _function(COMMANDS["train"][0])(["--recipe", argv[1], "--stage", f"stage{argv[0]}", *argv[2:]])


def bench_main(argv: Optional[List[str]] = None) -> int:
    """launch/bench.py with these arguments (a benchmark script of the checkout, not of the package)."""
    script = os.path.join(ROOT, "launch", "bench.py")
    if not os.path.isfile(script):
        print(f"error: {script} not found; attnedit bench runs from a checkout of megatron-attnedit (pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [script, *(sys.argv[2:] if argv is None else argv)]
    module = runpy.run_path(script)
    return module["main"]()


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: attnedit <command> [--help] [args ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", "examples:",
              "  attnedit quickstart --quick",
              "  attnedit convert --hf-dir /models/Qwen3-8B --save-dir /ckpt/qwen3-8b --tensor-model-parallel-size 4",
              "  attnedit distill 1 qwen3_8b_mla        # under torchrun: torchrun ... -m megatron_attnedit.cli distill 1 ...",
              "  attnedit export --load-dir runs/qwen3_8b_mla/stage2/checkpoints --save-dir out/qwen3-8b-mla",
              "  attnedit kv-report --preset qwen3-8b --target mla --kv-lora-rank 512",
              "",
              "attnedit <command> --help shows the command's flags and examples."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)} (attnedit --help)", file=sys.stderr)
        return 2
    return int(_function(COMMANDS[command][0])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
