"""Fused elementwise kernels (kernels/fusions.py, model.kernel_fusion) against megatron's unfused code.

The CUDA path is inductor's code for these functions; here inductor compiles the same functions for
the CPU. Tolerances: fp32 1e-6 (values and gradients); bf16: no further from an fp64 reference than
megatron's unfused bf16 result (which rounds after every op where the fused kernel keeps fp32).
Whole models: a tiny Qwen3, its MoE variant (grouped experts) and an MLA student (its query/key
assembly fused too), built with and without kernel_fusion from the same seed, give the same logits
and gradients (fp32, 1e-5); the MLA one also at TP=2, with and without sequence parallelism, on two
gloo processes (tests/workers/fused_mla_tp.py).
"""

import json

import pytest
import torch

from megatron_attnedit import platform
from megatron_attnedit import fixes
from megatron_attnedit.kernels import fusions
from megatron_attnedit.models import builder
from megatron_attnedit import families


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own variants (dynamo counts recompiles per function across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def unfused_rope():
    from megatron.core.models.common.embeddings import rope_utils

    return fusions.UNFUSED["rope"] if fusions.installed() else rope_utils._apply_rotary_pos_emb_bshd


def freqs_for(s, r, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat((f, f), dim=-1).view(s, 1, 1, r)


ROPE_CASES = {  # name: (heads, head width, rotary width, from a wider tensor, kwargs)
    "gqa": (4, 16, 16, False, {}),
    "mla": (4, 8, 8, True, {"multi_latent_attention": True}),  # a strided view, as MLA's q_pos_emb
    "partial": (2, 16, 8, False, {}),  # rotary_percent < 1: channels past r pass through
    "interleaved": (2, 16, 16, False, {"rotary_interleaved": True}),
    "mscale": (2, 16, 16, False, {"mscale": 0.7}),
}


def rope_inputs(heads, d, r, strided, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, b = 12, 2
    t = torch.randn(s, b, heads, d + (24 if strided else 0), generator=g, dtype=torch.float64)
    t = t[..., 24:] if strided else t
    return t.to(dtype), freqs_for(s, r), torch.randn(s, b, heads, d, generator=g, dtype=torch.float64)


def rope_run(fn, t, freqs, grad, kw):
    x = t.detach().clone().requires_grad_()
    out = fn(x, freqs, **kw)
    out.backward(grad.to(out.dtype))
    return out.detach().double(), x.grad.double()


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_matches_megatron_unfused(case):
    heads, d, r, strided, kw = ROPE_CASES[case]
    fused = fusions.compiled(fusions.rope_bshd)
    t, freqs, grad = rope_inputs(heads, d, r, strided, torch.float32)
    ref, got = rope_run(unfused_rope(), t, freqs, grad, kw), rope_run(fused, t, freqs, grad, kw)
    for name, a, b in zip(("output", "gradient"), ref, got):
        assert (a - b).abs().max().item() <= 1e-6, f"{case} fp32 {name}"
    assert (got[0] - t.double()).abs().max().item() > 0.1  # it rotates
    tb = t.to(torch.bfloat16)
    ref, got = rope_run(unfused_rope(), tb, freqs, grad, kw), rope_run(fused, tb, freqs, grad, kw)
    exact = rope_run(unfused_rope(), tb.double(), freqs.double(), grad.to(torch.bfloat16).double(), kw)
    for name, e, a, b in zip(("output", "gradient"), exact, ref, got):
        err_unfused, err_fused = (a - e).abs().max().item(), (b - e).abs().max().item()
        assert err_fused <= err_unfused, f"{case} bf16 {name}: fused {err_fused:.3e} > unfused {err_unfused:.3e}"


def test_glu_times_probs_compiled_equals_eager():
    g = torch.Generator().manual_seed(1)
    for clamp, offset in ((None, 0.0), (0.5, 1.0)):
        h, p, dy = torch.randn(37, 16, generator=g), torch.rand(37, 1, generator=g), torch.randn(37, 8, generator=g)
        outs = []
        for fn in (fusions.glu_times_probs, fusions.compiled(fusions.glu_times_probs)):
            x, q = h.clone().requires_grad_(), p.clone().requires_grad_()
            y = fn(x, q, torch.nn.functional.silu, clamp, offset)
            y.backward(dy)
            outs.append((y.detach(), x.grad, q.grad))
        for a, b in zip(*outs):
            assert (a - b).abs().max().item() <= 1e-6
    assert outs[0][2].abs().sum() > 0 and outs[0][1][:, :8].abs().sum() > 0  # gradients reach probs and the gate


@pytest.fixture
def compile_on_cpu(monkeypatch):
    """Fused functions compile for CPU tensors too; returns the names of those that ran compiled."""
    platform.init_distributed(platform.init_platform("cpu"))
    fixes.apply_one("rope_fusion")  # applied at start-up on CUDA; here the CPU takes it too
    monkeypatch.setattr(fusions, "DEVICES", {"cpu", "cuda"})
    used, compiled = set(), fusions.compiled

    def spy(fn):
        used.add(fn.__name__)
        return compiled(fn)

    monkeypatch.setattr(fusions, "compiled", spy)
    return used


def logits_and_grads(build):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    model = build()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    logits = model(tokens, pos, None)
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("kind", ["dense", "moe", "mla", "mla_q_lora"])
def test_fused_model_matches_unfused(compile_on_cpu, kind):
    from megatron_attnedit.config import TargetConfig
    from megatron_attnedit.targets.student import build_student

    preset = "qwen3-moe-debug" if kind == "moe" else "qwen3-debug"
    cfg = families.config_for_preset(preset)

    def build(fusion):
        opts = builder.BuildOptions(kernel_fusion=fusion, grouped_gemm=kind == "moe")
        if kind.startswith("mla"):
            options = {"kv_lora_rank": 16, "qk_pos_emb_head_dim": 8, "init": "random", "q_lora_rank": 24 if kind == "mla_q_lora" else None}
            return lambda: build_student(cfg, TargetConfig("mla", options), opts)
        return lambda: builder.build_model(cfg, opts)

    ref_logits, ref_grads = logits_and_grads(build(False))
    logits, grads = logits_and_grads(build(True))
    assert fusions.installed() and {"dense": "rope_bshd", "moe": "glu_times_probs", "mla": "mla_qkv", "mla_q_lora": "mla_qkv"}[kind] in compile_on_cpu
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for n in grads:
        assert (grads[n] - ref_grads[n]).abs().max().item() <= 1e-5 * max(1.0, ref_grads[n].abs().max().item()), n


def test_fused_mla_matches_megatron_at_tp2(tmp_path):
    """The fused MLA assembly at TP=2, with and without sequence parallelism and the query latent
    (column-parallel down-projections gathered and re-scattered as megatron's are): same logits and
    gradients as megatron's MLASelfAttention on every rank (fp32, 1e-5), and it really ran fused."""
    from conftest import torchrun

    torchrun("fused_mla_tp.py", "--out-dir", tmp_path, nproc=2)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {"q_full", "q_lora", "q_full_sp", "q_lora_sp"}
        for case, r in results.items():
            assert r["fused"] and r["n_grads"] > 5, (rank, case, r)
            assert r["logits"] <= 1e-5 and r["grads"] <= 1e-5, (rank, case, r)
