"""Shared fixtures: tiny HF checkpoints written by transformers, and a torchrun launcher."""

import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")
# The launch scripts tests start (pretrain.sh, bench.sh, ...) run on the interpreter under test, not
# on the one launch/python.sh would choose by itself (the project venv, say).
os.environ["PYTHON"] = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<script>`` (or a path) on ``nproc`` gloo processes on 127.0.0.1."""
    path = script if os.path.isabs(script) else os.path.join(WORKERS, script)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for attempt in range(3):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", path, *map(str, args),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        # The port was free when chosen but another program bound it first: choose again.
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr:
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """{'dense', 'moe', 'llama', 'llama_untied': dir}: random-weight Qwen3, Qwen3-MoE and Llama 3
    (llama3 RoPE scaling, GQA; tied and untied embeddings) checkpoints, fp32."""
    from megatron_attnedit.testing import make_tiny_hf

    base = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, preset, overrides in (("dense", "qwen3-debug", {}), ("moe", "qwen3-moe-debug", {}), ("llama", "llama3-debug", {}),
                                    ("llama_untied", "llama3-debug", {"tie_word_embeddings": False})):
        d = str(base / kind)
        make_tiny_hf(d, preset, seed=1, **overrides)
        out[kind] = d
    return out
