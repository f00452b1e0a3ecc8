"""Distillation losses against plain single-process references, and at TP=2 (vocab split over 2
gloo processes, never gathered) against TP=1."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import torchrun
from megatron_attnedit.distill import losses

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
    for name, (loss, grad) in got.items():
        _, (ref_loss, ref_grad) = ref[name]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{name} loss")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, msg=f"{name} grad")
