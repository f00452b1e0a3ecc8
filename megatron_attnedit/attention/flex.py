"""Sliding-window (and sink) attention on CUDA through FlexAttention with a block-sparse mask.

Sliding-window causal attention (query i sees keys i-W < j <= i) touches about W / (s/2) of the
score blocks that full causal attention touches. FlexAttention skips the blocks a ``BlockMask``
marks empty and applies the element mask only on the two partial blocks of each query block's
band, so its cost falls with the window (DESIGN.md section 6: 2.8x at 32K, 4.6x at 64K tokens for
W = 4096, against full causal SDPA).

* ``flex_attention`` is compiled once per process (``torch.compile``; eager FlexAttention
  materialises the scores and is only for CPU tests); a new shape or window recompiles once.
* Block masks are cached per (query length, key length, window, device): building one costs a
  pass over the block grid, which is not free at 128K.
* Learnable sinks (one logit per head, a virtual key with value zero) need no kernel change:
  with Z the kernel's softmax normaliser over real keys (lse = log Z),
  softmax([scores, sink]) . [v, 0] = out * Z / (Z + e^sink) = out * sigmoid(lse - sink).

Imports nothing from megatron, so the benchmark (launch/bench_attention.py) runs where only torch is
installed.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional, Tuple

import torch

# Launcher knobs (env): block-mask tile size, torch.compile mode, and extra Triton kernel options
# as JSON (tile sizes, warps, stages, BLOCKS_ARE_CONTIGUOUS...); launch/bench_attention.py sweeps
# them and prints the best set.
BLOCK_SIZE = int(os.environ.get("ATTNEDIT_FLEX_BLOCK", "128"))
COMPILE_MODE = os.environ.get("ATTNEDIT_FLEX_COMPILE_MODE") or None
KERNEL_OPTIONS: Optional[dict] = json.loads(os.environ.get("ATTNEDIT_FLEX_KERNEL_OPTIONS", "null"))

_COMPILED: Dict[str, Callable] = {}
_BLOCK_MASKS: Dict[Tuple, object] = {}
_MASK_CACHE_LIMIT = 64


def _flex_fn(device_type: str) -> Callable:
    """The flex_attention callable: compiled on accelerators, eager on CPU (tests only)."""
    fn = _COMPILED.get(device_type)
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        if device_type == "cpu":
            fn = flex_attention
        else:
            fn = torch.compile(flex_attention, dynamic=False, mode=COMPILE_MODE)
        _COMPILED[device_type] = fn
    return fn


def window_mask_mod(window: Optional[int], offset: int) -> Callable:
    """mask_mod of causal attention (window None) or of a causal window of W keys.

    ``offset`` = key length - query length: query index q is at absolute position q + offset.
    """
    if window is None:

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return causal

    def sliding(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (kv_idx <= pos) & (pos - kv_idx < window)

    return sliding


def block_mask(sq: int, sk: int, window: Optional[int], device) -> object:
    """The cached BlockMask of (sq, sk, window) on ``device``."""
    device = torch.device(device)
    key = (sq, sk, window, device.type, device.index, BLOCK_SIZE)
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        from torch.nn.attention.flex_attention import create_block_mask

        if len(_BLOCK_MASKS) >= _MASK_CACHE_LIMIT:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        bm = create_block_mask(
            window_mask_mod(window, sk - sq), B=None, H=None, Q_LEN=sq, KV_LEN=sk, device=device, BLOCK_SIZE=BLOCK_SIZE
        )
        _BLOCK_MASKS[key] = bm
    return bm


def _flex_call(fn, q, k, v, bm, scale, gqa, want_lse, kernel_options):
    kw = dict(block_mask=bm, scale=scale, enable_gqa=gqa)
    if kernel_options:
        kw["kernel_options"] = kernel_options
    if not want_lse:
        return fn(q, k, v, **kw), None
    try:  # torch >= 2.9
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        return out, aux.lse
    except ImportError:
        return fn(q, k, v, return_lse=True, **kw)


def flex_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: Optional[int],
    sink: Optional[torch.Tensor] = None,
    kernel_options: Optional[dict] = None,
) -> torch.Tensor:
    """Causal attention on [b, h, s, d] tensors, restricted to a window of W keys when ``window`` is
    set, with optional per-head sink logits ``sink`` [h]. GQA (fewer key/value heads) is native."""
    sq, sk = q.shape[2], k.shape[2]
    bm = block_mask(sq, sk, window, q.device)
    fn = _flex_fn(q.device.type)
    gqa = k.shape[1] != q.shape[1]
    out, lse = _flex_call(fn, q, k, v, bm, scale, gqa, sink is not None, kernel_options or KERNEL_OPTIONS)
    if sink is None:
        return out
    keep = torch.sigmoid(lse.float() - sink.float().view(1, -1, 1))
    return (out.float() * keep.unsqueeze(-1)).to(out.dtype)


def clear_caches() -> None:
    """Forget block masks and compiled kernels (after changing BLOCK_SIZE or COMPILE_MODE)."""
    _BLOCK_MASKS.clear()
    _COMPILED.clear()
