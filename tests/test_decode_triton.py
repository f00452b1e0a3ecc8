"""The one-pass Triton decode kernel (attention/decode_triton.py) against the matmul path, run by
Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before triton is imported: this file runs
it in a subprocess). The GPU runs the same kernel compiled (launch/bench_decode.py checks the engine
against transformers' forward there).

Cases: the three shapes the engine passes -- GQA (group 4 of 2 key heads), MLA (one latent key head
of 32 + 8 columns shared by 16 query heads, values a view of the keys' first 32 columns), GateSWA
(sinks) -- at positions inside the first split, across splits and at the cache's end, and with a
ring buffer that has wrapped (every slot valid)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, torch
    from megatron_attnedit.attention import decode_kernels, decode_triton

    torch.manual_seed(0)
    out = []
    def case(name, b, kvh, g, d, n, dv, positions, sinks=False, mla=False):
        q = torch.randn(b, kvh, g, d)
        if mla:
            k = torch.randn(b, 1, n, d)
            v = k[..., :dv]
        else:
            k, v = torch.randn(b, kvh, n, d), torch.randn(b, kvh, n, dv)
        s = torch.randn(kvh * g) if sinks else None
        for p in positions:
            pos = torch.tensor([p])
            assert decode_triton.usable(q, k, v), name
            got, kernel = decode_kernels.cached_attention(q, k, v, pos, 0.125, s, "triton")
            ref, ref_kernel = decode_kernels.cached_attention(q, k, v, pos, 0.125, s, "matmul")
            assert (kernel, ref_kernel) == ("triton", "matmul")
            err = float((got - ref).abs().max() / ref.abs().max())
            out.append(dict(case=name, pos=p, rel=err, splits=decode_triton._splits(b * kvh, n, q.device)[0]))
    case("gqa", 2, 2, 4, 64, 1024, 64, [0, 5, 300, 1023])
    case("mla", 2, 1, 16, 40, 768, 32, [0, 257, 767], mla=True)
    case("gate_swa_sinks", 1, 2, 4, 64, 640, 64, [3, 639, 5000], sinks=True)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_decode_equals_the_matmul_path(results):
    assert {r["case"] for r in results} == {"gqa", "mla", "gate_swa_sinks"}
    for r in results:
        assert r["rel"] < 1e-5, r


def test_cases_cross_several_splits(results):
    # a position past the first split combines partials from several programs (stage 2 is exercised)
    assert all(r["splits"] > 1 for r in results), results


def test_unusable_shapes_fall_back_or_refuse():
    import torch

    from megatron_attnedit.attention import decode_kernels, decode_triton
    from megatron_attnedit.errors import EvalError

    q, k, v = torch.randn(1, 1, 4, 48), torch.randn(1, 1, 64, 48), torch.randn(1, 1, 64, 48)  # 48 = 32 + 16: fine
    assert decode_triton.split_dim(48) == (32, 16)
    assert decode_triton.split_dim(96) == (64, 32) and decode_triton.split_dim(80) == (64, 16)
    assert decode_triton.split_dim(72) == (64, 8) and decode_triton.split_dim(100) is None  # 64 + 36: no
    pos = torch.tensor([10])
    out, kernel = decode_kernels.cached_attention(q, k, v, pos, 0.1)  # CPU without the interpreter: matmul
    assert kernel == "matmul" and out.shape == (1, 1, 4, 48)
    with pytest.raises(EvalError, match="Triton decode kernel cannot run"):
        decode_kernels.cached_attention(q, k, v, pos, 0.1, kernel="triton")
