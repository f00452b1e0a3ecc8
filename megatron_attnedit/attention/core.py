"""Flash core attention for megatron-core's local spec.

megatron's local ``DotProductAttention`` materialises the full [b, h, s, s] score matrix and needs
the CUDA RNG tracker; this module is a drop-in replacement (same constructor and ``forward``
signature) that calls a fused kernel instead:

* CUDA / CPU: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient /
  cuDNN kernels on CUDA) for full causal attention; on CUDA sliding-window layers and layers with
  sinks use cuDNN's diagonal-band kernel through the cuDNN frontend when it is installed
  (``cudnn_window.py``), else FlexAttention with a block-sparse mask (``flex.py``) for windows and
  cuDNN's causal kernel plus the sink's log-sum-exp term (``band.py``) for full layers with sinks
  (``window_kernel`` says how to choose otherwise); on the CPU, SDPA with an explicit boolean mask.
* Ascend: ``torch_npu.npu_fusion_attention`` (causal = sparse_mode 2/3, band = sparse_mode 4;
  ``npu.py``).

A window that covers the whole key sequence is plain causal attention and takes the causal path,
so a sliding-window layer with W >= sequence length computes bit for bit what a full layer does.

The window comes from ``config.window_size`` / ``config.window_attn_skip_freq`` exactly as
megatron's own attention reads them (``is_layer_window_attention``), so a per-layer pattern set on
the config reaches the kernel. A window of W means query i sees keys i-W < j <= i.

Learnable per-head sink logits (``config.softmax_type == "learnable"``, megatron's
``softmax_offset``) add one virtual key per head whose score is the sink logit and whose value is
zero: the attention weights of real keys are softmax over [scores, sink].
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_attnedit import platform
from megatron_attnedit.attention import band, cudnn_window
from megatron_attnedit.attention.band import band_attention
from megatron_attnedit.attention.cudnn_window import window_attention
from megatron_attnedit.attention.flex import flex_window_attention
from megatron_attnedit.attention.masks import attention_with_sink, window_mask  # noqa: F401  (core.window_mask: the tests' reference)
from megatron_attnedit.attention.npu import npu_attention


def layer_window(config, layer_number: int) -> Optional[int]:
    """The window W of this (1-indexed) layer, or None for full causal attention."""
    if not is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        return None
    left = config.window_size[0]
    # megatron / flash-attn convention: (left, right) with left = W - 1 keys before the query.
    return None if left is None or left < 0 else int(left) + 1


def reference_attention(q, k, v, scale: float, window: Optional[int], sink: Optional[torch.Tensor] = None):
    """Dense-mask attention in fp32 on [b, h, s, d] tensors; the ground truth kernels are tested against."""
    b, h, sq, _ = q.shape
    hk = k.shape[1]
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    mask = window_mask(sq, k.shape[2], window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sink is not None:
        sink_col = sink.float().view(1, h, 1, 1).expand(b, h, sq, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention(q, k, v, scale: float, window: Optional[int], sink: Optional[torch.Tensor] = None):
    """Causal (optionally windowed, optionally with sinks) attention on [b, h, s, d] tensors.

    q [b, h, sq, dk], k [b, hk, sk, dk], v [b, hk, sk, dv] with hk dividing h (GQA); dv may differ
    from dk (MLA). Queries are aligned to the end of the keys (query i is at position i + sk - sq).
    """
    plat = platform.active().name
    sq, sk = q.shape[2], k.shape[2]
    if window is not None and window >= sk:
        window = None  # the window covers every key: plain causal attention
    if plat == "npu":
        return npu_attention(q, k, v, scale, window, sink)
    gqa = k.shape[1] != q.shape[1]
    if sink is None and window is None and sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if plat == "cuda":
        kernel = window_kernel(q, v.shape[-1], window) if sq == sk else "flex"
        if kernel == "cudnn_window":
            return window_attention(q, k, v, scale, window, sink)
        if kernel != "flex":
            return band_attention(q, k, v, scale, window, sink, kernel=kernel)
        return flex_window_attention(q, k, v, scale, window, sink)
    allowed = window_mask(sq, sk, window, q.device)
    if sink is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return attention_with_sink(q, k, v, scale, allowed, sink, gqa)


def window_kernel(q: torch.Tensor, dv: int, window: Optional[int]) -> str:
    """Kernel for windowed or sink attention on CUDA, from ``ATTNEDIT_WINDOW_KERNEL``:

    * auto (default): cuDNN's diagonal-band kernel when the cuDNN frontend is installed and runs
      here (``cudnn_window.py``: 14.8 ms fwd+bwd at 32K, W = 4096 on an H100, 3.68x SDPA's full
      causal 54.5 ms; ``launch/bench_attention.py``). Without it, windowed layers take
      FlexAttention (18.2 ms) and full causal layers with sinks take the band path on cuDNN's
      causal kernel (one chunk: the kernel plus the sink's log-sum-exp term; 57.8 ms vs
      FlexAttention's 78.1 ms).
    * cudnn_window: the frontend's band kernel for every layer (an error if it cannot run).
    * cudnn / flash: the band decomposition (``band.py``) on that causal kernel for every layer.
    * flex: FlexAttention for every layer.
    """
    choice = os.environ.get("ATTNEDIT_WINDOW_KERNEL", "auto")
    if choice not in ("auto", "cudnn_window", "cudnn", "flash", "flex"):
        raise ValueError(f"ATTNEDIT_WINDOW_KERNEL={choice!r}: use auto, cudnn_window, cudnn, flash or flex")
    if choice in ("auto", "cudnn_window"):
        if cudnn_window.usable(q, dv):
            return "cudnn_window"
        if choice == "cudnn_window":
            raise RuntimeError(
                f"ATTNEDIT_WINDOW_KERNEL=cudnn_window: cuDNN's band kernel does not run for {q.dtype} head size "
                f"{q.shape[-1]} here (is the cuDNN frontend installed? pip install --no-deps 'nvidia-cudnn-frontend>=1.32,<2'); use auto"
            )
    if choice == "flex" or (choice == "auto" and window is not None):
        return "flex"
    name = "cudnn" if choice == "auto" else choice
    if band.usable(name, q, dv):
        return name
    if choice != "auto":
        raise RuntimeError(f"ATTNEDIT_WINDOW_KERNEL={choice}: that kernel does not run for {q.dtype} head size {q.shape[-1]} here; use flex")
    return "flex"


class FlashCoreAttention(MegatronModule):
    """Same interface as ``megatron.core.transformer.dot_product_attention.DotProductAttention``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("FlashCoreAttention does not support context parallelism; use the TE spec")
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size() if pg_collection is None else pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.heads_per_partition = config.num_attention_heads // tp
        # MLA passes its query/key width (no-RoPE + RoPE part) and its softmax scale explicitly.
        head_dim = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.window = layer_window(config, self.layer_number)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if config.softmax_type == "learnable":
            # Sink logits, one per local head; start at -inf-like so the layer starts as plain softmax
            # (targets may set another start value in their initializer).
            self.softmax_offset = torch.nn.Parameter(
                torch.full((self.heads_per_partition,), -20.0, dtype=config.params_dtype)
            )
            setattr(self.softmax_offset, "tensor_model_parallel", True)
            setattr(self.softmax_offset, "partition_dim", 0)
            setattr(self.softmax_offset, "partition_stride", 1)
        elif config.softmax_type == "vanilla":
            self.softmax_offset = None
        else:
            raise ValueError(f"softmax_type {config.softmax_type!r} is not supported by FlashCoreAttention")

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("FlashCoreAttention: packed sequences and attention bias need the TE spec")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = attention(q, k, v, self.softmax_scale, self.window, self.softmax_offset)
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = {}
        if self.softmax_offset is not None:
            state = {"softmax_offset": self.softmax_offset}
        return make_sharded_tensors_for_checkpoint(state, prefix, {"softmax_offset": 0}, sharded_offsets)
