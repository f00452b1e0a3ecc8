"""Distillation losses against plain single-process references, and at TP=2 (vocab split over 2
gloo processes, never gathered) against TP=1."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import torchrun
from megatron_attnedit.training import losses

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
from distill_losses import case_tensors  # noqa: E402

REAL_V = 200  # the last 56 logits are vocabulary padding


def ref_kl(s, t, mask, T):
    ls = torch.log_softmax(s[..., :REAL_V] / T, -1)
    lt = torch.log_softmax(t[..., :REAL_V] / T, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    return T * T * (kl * mask).sum() / mask.sum()


def ref_topk(s, t, k, mask, T):
    vals, ids = (t[..., :REAL_V] / T).topk(k, -1)
    p = torch.softmax(vals, -1)
    lq = torch.log_softmax(s[..., :REAL_V] / T, -1).gather(-1, ids)
    kl = (p * (p.log() - lq)).sum(-1)
    return T * T * (kl * mask).sum() / mask.sum()


def ref_ce(s, labels, mask):
    ce = F.cross_entropy(s[..., :REAL_V].reshape(-1, REAL_V), labels.reshape(-1), reduction="none").view(labels.shape)
    return (ce * mask).sum() / mask.sum()


def ref_nmse(a, b):
    return ((a - b).pow(2).sum(-1) / b.pow(2).sum(-1)).mean()


def ref_cos(a, b):
    return 0.05 * (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def references():
    s, t, labels, mask, h_s, h_t = case_tensors()
    cases = {
        "kl": (s, lambda x: ref_kl(x, t, mask, 2.0), lambda x: losses.kl_divergence(x, t, mask, 2.0, REAL_V)),
        "topk": (s, lambda x: ref_topk(x, t, 8, mask, 2.0), lambda x: losses.topk_kl_divergence(x, t, 8, mask, 2.0, REAL_V)),
        "ce": (s, lambda x: ref_ce(x, labels, mask), lambda x: losses.cross_entropy(x, labels, mask, REAL_V)),
        "nmse": (h_s, lambda x: ref_nmse(x, h_t), lambda x: losses.normalized_mse(x, h_t)),
        "cos": (h_s, lambda x: ref_cos(x, h_t), lambda x: losses.feature_cosine(x, h_t, 0.05)),
    }
    out = {}
    for name, (x0, ref, ours) in cases.items():
        got = []
        for fn in (ref, ours):
            x = x0.clone().requires_grad_(True)
            loss = fn(x)
            loss.backward()
            got.append((loss.detach(), x.grad))
        out[name] = got
    return out


@pytest.mark.parametrize("name", ["kl", "topk", "ce", "nmse", "cos"])
def test_losses_match_reference(name):
    (ref_loss, ref_grad), (loss, grad) = references()[name]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_kl_is_zero_for_identical_logits_and_topk_full_equals_dense():
    s, t, _, mask, _, _ = case_tensors()
    assert losses.kl_divergence(t, t, mask, 1.0, REAL_V).abs().item() < 1e-6
    dense = losses.kl_divergence(s, t, mask, 1.0, REAL_V)
    full = losses.topk_kl_divergence(s, t, REAL_V, mask, 1.0, REAL_V)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-6)


def test_mismatched_logits_give_one_clear_line():
    s = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="teacher and student must share the vocabulary"):
        losses.kl_divergence(s, torch.zeros(2, 3, 16))


def test_tp2_equals_tp1(tmp_path):
    torchrun("distill_losses.py", tmp_path / "out.pt", nproc=2)
    got = torch.load(tmp_path / "out.pt")
    ref = references()
    s, t, labels, mask, _, _ = case_tensors()
    for name, fn in {  # real vocabulary 120: at TP2 rank 1 holds only padding
        "kl@4_v120": lambda x: losses.kl_divergence(x, t, mask, 2.0, 120),
        "ce@4_v120": lambda x: losses.cross_entropy(x, labels.clamp(max=119), mask, 120),
    }.items():
        x = s.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        ref[name] = (None, (loss.detach(), x.grad))
    assert {"kl@4", "topk@4", "ce@4", "kl@4_v120"} <= set(got)
    for name, (loss, grad) in got.items():
        _, (ref_loss, ref_grad) = ref[name] if name in ref else ref[name.split("@")[0]]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{name} loss")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, msg=f"{name} grad")


# ----------------------------------------------------------------------------------------------
# Token chunks: every chunk size gives the unchunked values and gradients
# ----------------------------------------------------------------------------------------------
# fp32; tolerance 1e-6 relative (plus 1e-9 absolute for gradient entries that are ~0, e.g. the
# padded ids): chunking changes only the fp32 summation order of per-token reductions.


def _chunk_case(layout):
    """Logits [b=2, s=7, V=256] (last 56 ids padding), in GPTModel's layout (a transposed view of a
    contiguous [s, b, V]: chunks along s) or plain contiguous [b, s, V] (chunks along b)."""
    g = torch.Generator().manual_seed(1)
    shape = (7, 2, 256) if layout == "sbh" else (2, 7, 256)
    s, t = (torch.randn(shape, generator=g) * 3 for _ in range(2))
    if layout == "sbh":
        s, t = s.transpose(0, 1), t.transpose(0, 1)
    labels = torch.randint(0, REAL_V, (2, 7), generator=g)
    mask = (torch.rand(2, 7, generator=g) > 0.2).float()
    return s, t, labels, mask


CHUNKED = {
    "kl": lambda x, t, labels, mask, c: losses.kl_divergence(x, t, mask, 2.0, REAL_V, chunk_tokens=c),
    "topk": lambda x, t, labels, mask, c: losses.topk_kl_divergence(x, t, 8, mask, 2.0, REAL_V, chunk_tokens=c),
    "ce": lambda x, t, labels, mask, c: losses.cross_entropy(x, labels, mask, REAL_V, chunk_tokens=c),
}


def _loss_and_grad(fn, s, *args):
    x = s.detach().clone().requires_grad_(True)  # clone keeps the layout (strides)
    loss = fn(x, *args)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("layout", ["sbh", "plain"])
@pytest.mark.parametrize("name", list(CHUNKED))
def test_chunked_equals_unchunked(name, layout):
    s, t, labels, mask = _chunk_case(layout)
    whole_loss, whole_grad = _loss_and_grad(CHUNKED[name], s, t, labels, mask, 0)
    # sbh: 2 tokens per row of 7 -> chunk 6 = 3 rows (3, 3, 1: uneven), chunk 1 = 1 row; plain: 7 per row
    for chunk in (1, 6, 9, None):
        loss, grad = _loss_and_grad(CHUNKED[name], s, t, labels, mask, chunk)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0, msg=f"{name} chunk {chunk} loss")
        torch.testing.assert_close(grad, whole_grad, rtol=1e-6, atol=1e-9, msg=f"{name} chunk {chunk} grad")
    assert whole_grad[..., REAL_V:].abs().max() == 0  # padded ids get no gradient


def test_automatic_chunk_follows_the_byte_budget(monkeypatch):
    assert losses.chunk_size(151936, None) == losses.CHUNK_BYTES // (4 * 151936)
    assert losses.chunk_size(256, 0) >= 2**31 and losses.chunk_size(256, 5) == 5
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        losses.chunk_size(256, -1)
    s, t, labels, mask = _chunk_case("sbh")
    whole = _loss_and_grad(CHUNKED["kl"], s, t, labels, mask, 0)
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 256 * 4)  # 4 tokens = 2 rows of s per chunk
    assert losses.chunk_size(256, None) == 4
    auto = _loss_and_grad(CHUNKED["kl"], s, t, labels, mask, None)
    torch.testing.assert_close(auto, whole, rtol=1e-6, atol=1e-9)


def test_chunked_gradient_lands_in_the_output_layers_layout():
    """Logits as GPTModel returns them: the gradient is a contiguous [s, b, V] seen as [b, s, V]
    (no copy needed in stage2._SBHGrad), also for b = 1 where both layouts look contiguous."""
    for b in (1, 2):
        x = torch.randn(7, b, 256).transpose(0, 1).requires_grad_(True)
        losses.kl_divergence(x, torch.randn(b, 7, 256), chunk_tokens=2).backward()
        assert x.grad.transpose(0, 1).stride() == (b * 256, 256, 1)


def test_no_grad_value_equals_training_value_and_single_backward():
    s, t, labels, mask = _chunk_case("sbh")
    for fn in CHUNKED.values():
        with torch.no_grad():
            ev = fn(s.clone().requires_grad_(True), t, labels, mask, 3)
        torch.testing.assert_close(ev, fn(s.clone().requires_grad_(True), t, labels, mask, 3), rtol=0, atol=0)
    x = s.clone().requires_grad_(True)
    loss = losses.kl_divergence(x, t, mask, chunk_tokens=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the gradient buffer was scaled in place: a second backward is refused


def test_bf16_chunked_gradient_within_bf16_precision():
    """bf16 logits: the gradient is rounded twice (q - p, then scaled); against an fp64 reference it
    stays within a few bf16 units of the largest entry."""
    s, t, _, mask = _chunk_case("sbh")
    ref_loss, ref_grad = _loss_and_grad(lambda x: ref_kl(x, t.double(), mask.double(), 2.0), s.double())
    x = s.to(torch.bfloat16).requires_grad_(True)
    loss = losses.kl_divergence(x, t.to(torch.bfloat16), mask, 2.0, REAL_V, chunk_tokens=4)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=0)  # inputs rounded to bf16
    scale = ref_grad.abs().max()
    assert (x.grad.double() - ref_grad).abs().max() < 0.02 * scale


def test_fused_passes_equal_the_eager_passes(monkeypatch):
    """The inductor-compiled loss passes (used on CUDA) against the same passes run eagerly, here
    compiled for the CPU: KL, CE (one target id: the fused compare path) and top-k KL (4 ids: the
    same path, unrolled), bf16 logits. Tolerance: losses (fp64 sums) to 1e-6 relative; the bf16
    gradient to two bf16 steps (2^-6 relative): inductor's exp may differ from ATen's in the last
    fp32 bit, and q - p, a difference of two exps, can then cross a bf16 rounding boundary (seen:
    2 units at 3.0e-5, in under 1% of the entries). On an H100,
    launch/bench_losses.py gives the same loss and gradients within 2e-9 (largest entry 5e-5)."""
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    s = (torch.randn(48, 2, vocab, generator=g) * 2).bfloat16().transpose(0, 1).requires_grad_()
    t = (torch.randn(48, 2, vocab, generator=g) * 2).bfloat16().transpose(0, 1)
    labels = torch.randint(0, vocab - 8, (2, 48), generator=g)
    cases = {
        "kl": lambda: losses.kl_divergence(s, t, None, 2.0, vocab - 8, None),
        "ce": lambda: losses.cross_entropy(s, labels, None, vocab - 8, None),
        "topk": lambda: losses.topk_kl_divergence(s, t, 4, None, 1.0, vocab - 8, None),
    }
    got = {}
    for fused in (False, True):
        monkeypatch.setattr(losses, "_fuses", lambda x, fused=fused: fused)
        for name, fn in cases.items():
            s.grad = None
            loss = fn()
            loss.backward()
            got[name, fused] = (loss.detach(), s.grad.clone())
    assert losses._COMPILED, "no pass was compiled"
    for name in cases:
        (a, ga), (b, gb) = got[name, False], got[name, True]
        assert abs((a - b).item()) <= 1e-6 * abs(a.item()), (name, a.item(), b.item())
        err = (ga.float() - gb.float()).abs() - 2**-6 * torch.maximum(ga.float().abs(), gb.float().abs())
        assert err.max().item() <= 1e-12, (name, (ga.float() - gb.float()).abs().max().item())
        assert (ga != gb).float().mean().item() < 0.01, name  # rare boundary cases, not a different formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalized_mse_passes(monkeypatch, dtype):
    """Stage 1's loss as two passes (compiled here for the CPU, as on CUDA) against eager autograd
    of the per-token formula: loss and gradient to 1e-6 relative (fp32 sums either way; bf16 inputs
    are the same rounded values for both). The target may be changed in place after the call --
    the teacher's layer adds its residual into it -- without touching the gradient."""
    g = torch.Generator().manual_seed(0)
    pred0 = torch.randn(12, 2, 64, generator=g).to(dtype)
    target0 = torch.randn(12, 2, 64, generator=g).to(dtype)
    x = pred0.clone().requires_grad_()
    ref = losses.normalized_mse_per_token(x, target0).mean()
    ref.backward()
    for fused in (False, True):
        monkeypatch.setattr(losses, "_fuses", lambda t, fused=fused: fused)
        x, target = pred0.clone().requires_grad_(), target0.clone()
        loss = losses.normalized_mse(x, target)
        target.add_(1.0)  # what the teacher's residual add does to its attention output
        loss.backward()
        assert x.grad.dtype == dtype
        assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item(), fused
        grad_ref = pred0.clone().requires_grad_()
        losses.normalized_mse_per_token(grad_ref, target0).mean().backward()
        assert (x.grad.float() - grad_ref.grad.float()).abs().max().item() <= 1e-6 * grad_ref.grad.float().abs().max().item(), fused
    assert losses._COMPILED.get(losses._nmse_forward) is not None and losses._COMPILED.get(losses._nmse_backward) is not None
