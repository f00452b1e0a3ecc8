"""The logits gradient stage 2 hands to the (frozen, shared) output layer has canonical [s, b, V]
strides, so torch.matmul runs one GEMM instead of the batched kernel measured 200x slower on GPU."""

import torch

from megatron_attnedit.distill.stage2 import _grad_in_sbh_layout


def _matmul_ops(t, w):
    with torch.profiler.profile() as prof:
        t.matmul(w)
    return {e.key for e in prof.key_averages()} & {"aten::mm", "aten::bmm"}


def test_gradient_value_unchanged_and_layout_folds_to_one_gemm():
    s, v, h = 32, 64, 8
    logits = torch.randn(s, 1, v).transpose(0, 1).contiguous().requires_grad_(True)  # as GPTModel returns
    g = torch.randn(1, s, v)
    _grad_in_sbh_layout(logits).backward(g)
    assert torch.equal(logits.grad, g)
    sbv = logits.grad.transpose(0, 1)  # what the output layer's backward receives
    w = torch.randn(v, h)
    assert _matmul_ops(sbv, w) == {"aten::mm"}
    assert _matmul_ops(g.transpose(0, 1), w) == {"aten::bmm"}  # the layout without the fix


def test_chunked_kl_gradient_passes_through_without_a_copy():
    """The chunked losses already write the gradient as a contiguous [s, b, V]: _SBHGrad hands it on."""
    from megatron_attnedit.training import losses

    s, v = 32, 64
    for b in (1, 2):
        logits = torch.randn(s, b, v).transpose(0, 1).requires_grad_(True)
        seen = []
        logits.register_hook(lambda g: seen.append(g))
        out = _grad_in_sbh_layout(logits)
        out.register_hook(lambda g: seen.append(g))
        losses.kl_divergence(out, torch.randn(b, s, v), chunk_tokens=8).backward()
        assert seen[0].data_ptr() == seen[1].data_ptr()  # the same buffer on both sides of _SBHGrad
        assert _matmul_ops(logits.grad.transpose(0, 1), torch.randn(v, 8)) == {"aten::mm"}
