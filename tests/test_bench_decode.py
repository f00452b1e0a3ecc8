"""launch/bench_decode.py end to end on CPU (tiny preset, megatron-core made unimportable, as on the
GPU machines): one JSON line per model and context, measured cache == formula in every layer, the
raw rows in --out; and bad flags in one line."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Runs the script with every megatron module refused at import (the GPU image has no megatron-core).
NO_MEGATRON = (
    "import sys, runpy\n"
    "class Refuse:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'megatron' or name.startswith('megatron.'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')\n"
    "sys.meta_path.insert(0, Refuse())\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", NO_MEGATRON, os.path.join(ROOT, "launch", "bench_decode.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_bench_decode_cpu_smoke(tmp_path):
    out = tmp_path / "decode.json"
    # contexts below and above the debug presets' GateSWA window of 32
    p = run("--preset", "qwen3-debug", "--device", "cpu", "--layers", "3", "--contexts", "24,96", "--steps", "3",
            "--pattern", "SSF", "--max-batch", "3", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert [(r["model"], r["context"]) for r in rows] == [(m, c) for m in ("teacher", "mla", "gate_swa") for c in (24, 96)]
    for r in rows:
        assert r["cache"]["equal"] and r["cache"]["per_layer_measured"] == r["cache"]["per_layer_formula"], r["cache"]
        assert r["prefill"]["tokens"] == r["context"] - 5 and r["prefill"]["seconds"] > 0
        assert r["batch1"]["tokens_per_s"] > 0 and r["max_batch"]["sequences"] == 3 and r["max_batch"]["tokens_per_s"] > 0
        assert r["at_preset_layers"]["layers"] == 4  # the preset has 4 layers
        assert r["check"]["ok"] and r["check"]["tokens_equal"] and r["check"]["steps"] == 9  # fp32 on the CPU: 1e-4
        assert r["at_preset_layers"]["cache_bytes_per_token"] > r["cache"]["bytes_per_token_measured"]
    by = {(r["model"], r["context"]): r["cache"]["bytes_per_token_measured"] for r in rows}
    full = 3 * 2 * 2 * 16 * 4  # 3 layers x K and V x 2 KV heads x 16 x fp32
    assert by["teacher", 24] == by["teacher", 96] == full
    assert by["mla", 96] == 3 * (32 + 8) * 4
    assert by["gate_swa", 24] == full and by["gate_swa", 96] == pytest.approx(full * (2 * 32 / 96 + 1) / 3, rel=1e-12)  # S S F, W = 32
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["rows"] == rows and saved["device"] == "cpu"
    assert "[bench_decode" in p.stderr and "prefill of 91 tokens" in p.stderr  # the phases' timing


def test_bench_decode_bad_flags():
    p = run("--preset", "qwen3-debug", "--device", "cpu", "--contexts", "8", "--steps", "8", "--max-batch", "2", timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "every context must exceed --steps + --warmup" in lines[-1], p.stderr
    p = run("--preset", "qwen3-debug", "--device", "cpu", "--contexts", "64", timeout=120)
    assert p.returncode == 2 and "--device cpu needs --max-batch" in p.stderr.strip().splitlines()[-1], p.stderr
