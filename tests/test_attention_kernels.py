"""Attention kernels against the dense-mask reference (core.reference_attention), fp32 on CPU.

CPU SDPA paths run as in training; FlexAttention runs eagerly (the CUDA build compiles the same
call); the Ascend kernel cannot run here, so its argument construction is checked against the band
semantics documented for npu_fusion_attention.
"""

import warnings

import pytest
import torch

from megatron_attnedit import platform
from megatron_attnedit.attention import band, core, cudnn_window, flex, npu

platform.init_platform("cpu")
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

TOL = 2e-6

# (heads, kv heads, q len, k len, dk, dv)
SHAPES = [(4, 4, 40, 40, 16, 16), (4, 2, 40, 40, 16, 16), (4, 1, 9, 40, 24, 16)]
WINDOWS = [None, 1, 7, 100]


def _qkv(h, hk, sq, sk, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, sq, dk, generator=g)
    k = torch.randn(2, hk, sk, dk, generator=g)
    v = torch.randn(2, hk, sk, dv, generator=g)
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("sinks", [False, True], ids=["nosink", "sink"])
def test_cpu_and_flex_match_reference(shape, window, sinks):
    h, hk, sq, sk, dk, dv = shape
    q, k, v = _qkv(h, hk, sq, sk, dk, dv)
    sink = torch.linspace(-2.0, 1.0, h) if sinks else None
    scale = dk**-0.5
    ref = core.reference_attention(q, k, v, scale, window, sink)
    got = core.attention(q, k, v, scale, window, sink)
    assert (got - ref).abs().max().item() <= TOL
    fx = flex.flex_window_attention(q, k, v, scale, window if window is None or window < sk else None, sink)
    assert (fx - ref).abs().max().item() <= TOL


# (heads, kv heads, length, dk, dv, window): chunked exactly, padded (37 = 4*8+5), GQA, MQA, a
# window of 2, full causal (None) and a window longer than the sequence.
BAND_CASES = [(4, 4, 32, 16, 16, 8), (4, 2, 37, 16, 16, 8), (4, 1, 33, 24, 16, 8), (2, 2, 16, 8, 8, 2), (4, 2, 40, 16, 16, None), (4, 2, 20, 16, 16, 64)]


def _matches_reference_with_gradients(attend, case, sinks, seed, layout_check=False):
    """``attend(q, k, v, scale, window, sink)`` in fp64 against autograd through the dense-mask
    reference: outputs and the gradients of q, k, v and the sinks."""
    h, hk, s, dk, dv, window = case
    q, k, v = (x.double().requires_grad_() for x in _qkv(h, hk, s, s, dk, dv, seed=seed))
    sink = torch.linspace(-1.0, 2.0, h, dtype=torch.float64).requires_grad_() if sinks else None
    ins = (q, k, v) + ((sink,) if sinks else ())
    grad = torch.randn(2, h, s, dv, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    got = attend(q, k, v, dk**-0.5, window, sink)
    ref = core.reference_attention(q, k, v, dk**-0.5, window, sink)
    assert got.shape == ref.shape
    if layout_check:
        assert got.permute(2, 0, 1, 3).is_contiguous()  # [s, b, h, d] memory, as megatron wants
    assert (got - ref).abs().max().item() <= TOL
    for name, a, b in zip("q k v sink".split(), torch.autograd.grad(got, ins, grad), torch.autograd.grad(ref, ins, grad)):
        assert (a - b).abs().max().item() <= 5 * TOL * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("case", BAND_CASES, ids=str)
@pytest.mark.parametrize("sinks", [False, True], ids=["nosink", "sink"])
def test_band_decomposition_matches_reference_with_gradients(case, sinks):
    """The band decomposition (two causal-kernel calls merged through their log-sum-exps, backward
    through the merged output) on the fp32 reference kernel. On CUDA the same code runs cuDNN's
    causal kernel (launch/bench_attention.py checks it against fp32 at bf16)."""
    attend = lambda *a: band.band_attention(*a, kernel="math")  # noqa: E731
    _matches_reference_with_gradients(attend, case, sinks, seed=3, layout_check=True)


def test_window_kernel_choice(monkeypatch):
    q = torch.zeros(1, 2, 8, 16)
    assert core.window_kernel(q, 16, 4) == "flex" and core.window_kernel(q, 16, None) == "flex"  # no cuDNN on a CPU
    monkeypatch.setenv("ATTNEDIT_WINDOW_KERNEL", "cudnn")
    with pytest.raises(RuntimeError, match="use flex"):
        core.window_kernel(q, 16, None)
    monkeypatch.setenv("ATTNEDIT_WINDOW_KERNEL", "fast")
    with pytest.raises(ValueError, match="auto, cudnn_window, cudnn, flash or flex"):
        core.window_kernel(q, 16, None)
    monkeypatch.setenv("ATTNEDIT_WINDOW_KERNEL", "cudnn_window")
    with pytest.raises(RuntimeError, match="nvidia-cudnn-frontend"):
        core.window_kernel(q, 16, 4)
    assert not cudnn_window.usable(q, 16)


# (heads, kv heads, length, dk, dv, window): windows of 1, 2 and 8, GQA, MQA, MLA-like widths,
# full causal (None) and a window longer than the sequence.
WINDOW_CASES = [(4, 4, 32, 16, 16, 8), (4, 2, 37, 16, 16, 8), (4, 1, 33, 24, 16, 2), (2, 2, 16, 8, 8, 1), (4, 2, 40, 16, 16, None), (4, 2, 20, 16, 16, 64)]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
@pytest.mark.parametrize("sinks", [False, True], ids=["nosink", "sink"])
def test_band_kernel_sink_composition_matches_reference_with_gradients(case, sinks):
    """cudnn_window's autograd Function -- band kernel without sinks, sinks composed from its
    log-sum-exp, kernel backward run with the sink-normalised output and lse -- on the fp32 math
    kernel of the same fwd/bwd contract. On CUDA the same Function runs cuDNN's band kernel
    (launch/bench_attention.py checks it against fp32 at bf16)."""
    attend = lambda *a: cudnn_window.window_attention(*a, kernel="math")  # noqa: E731
    _matches_reference_with_gradients(attend, case, sinks, seed=5)


def test_window_covering_sequence_is_bitwise_causal():
    q, k, v = _qkv(4, 2, 32, 32, 16, 16)
    full = core.attention(q, k, v, 0.25, None)
    assert torch.equal(core.attention(q, k, v, 0.25, 32), full)
    assert not torch.equal(core.attention(q, k, v, 0.25, 31), full)


def test_window_semantics():
    m = core.window_mask(6, 6, 3, "cpu")
    # query i sees keys i-3 < j <= i
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[1].tolist() == [True, True, False, False, False, False]


def test_flex_block_masks_are_cached():
    flex.clear_caches()
    a = flex.block_mask(256, 256, 64, "cpu")
    assert flex.block_mask(256, 256, 64, "cpu") is a
    assert flex.block_mask(256, 256, 32, "cpu") is not a
    # the band of a 64-key window touches at most 2 of the 128-key blocks per query block
    dense = a.to_dense()[0, 0]
    assert dense.sum(-1).max().item() <= 2


def _band_mask_from_npu_args(sq, sk, kw):
    """Masked positions as documented for npu_fusion_attention (True = masked): sparse_mode 2 is
    upper-left causal, 3 lower-right causal, 4 a band pre_tockens back / next_tockens ahead,
    aligned lower-right: masked = triu(k=next+1+sk-sq) + tril(k=-pre-1+sk-sq)."""
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(sk).unsqueeze(0)
    mode = kw["sparse_mode"]
    if mode == 2:
        return j > i
    off = sk - sq
    if mode == 3:
        return j > i + off
    assert mode == 4
    return (j > i + off + kw["next_tockens"]) | (j < i + off - kw["pre_tockens"])


@pytest.mark.parametrize("sq,sk", [(64, 64), (8, 64)])
@pytest.mark.parametrize("window", [None, 1, 5, 63, 64, 200])
def test_npu_arguments_give_the_window(sq, sk, window):
    w = window if window is None or window < sk else None  # core.attention's normalisation
    kw = npu.fusion_attention_args(sq, sk, heads=4, scale=0.125, window=w)
    assert kw["input_layout"] == "BNSD" and kw["head_num"] == 4 and kw["scale"] == 0.125
    allowed = ~_band_mask_from_npu_args(sq, sk, kw)
    assert torch.equal(allowed, core.window_mask(sq, sk, w, "cpu"))


def test_npu_compressed_mask():
    m = npu.compressed_mask("cpu")
    assert m.shape == (2048, 2048) and m.dtype == torch.bool
    assert not m[5, 5] and m[5, 6] and not m[6, 5]


def test_core_module_handles_mla_widths():
    """FlashCoreAttention with MLA's k_channels/v_channels (query/key 24 wide, values 16)."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        platform.init_distributed(platform.active())
    cfg = SimpleNamespace(
        context_parallel_size=1, num_attention_heads=4, kv_channels=16, window_size=None, window_attn_skip_freq=None,
        attention_dropout=0.0, softmax_type="vanilla", params_dtype=torch.float32,
    )
    mod = core.FlashCoreAttention(cfg, 1, None, "self", softmax_scale=None, k_channels=24, v_channels=16)
    assert abs(mod.softmax_scale - 24**-0.5) < 1e-12
    q, k, v = _qkv(4, 4, 10, 10, 24, 16)
    out = mod(*(x.permute(2, 0, 1, 3) for x in (q, k, v)))
    ref = core.reference_attention(q, k, v, 24**-0.5, None).permute(2, 0, 1, 3).reshape(10, 2, 64)
    assert (out - ref).abs().max().item() <= TOL
