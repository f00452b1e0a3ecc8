"""What a cached attention kind provides to the engine (one instance per layer).

The engine allocates, then calls ``prefill`` once on the prompt (positions 0 .. s-1) and ``step``
once per generated token. Both take the layer's normalised input x [b, s, hidden] and the RoPE rows
(cos, sin [s, d/2]) of the positions they compute, and return the attention's output after o_proj,
[b, s, hidden]. ``step`` gets the position as a one-element device tensor and must not read it on
the host, so that a CUDA graph can replay it at every position.
"""

from __future__ import annotations

from typing import List

import torch

from megatron_attnedit.attention.decode_kernels import cached_attention


def per_layer(pattern, num_layers: int) -> List[str]:
    """A per-layer list of kind letters from a list, or a string tiled over the layers ("SSSSSF")."""
    if isinstance(pattern, str):
        return [pattern[i % len(pattern)] for i in range(num_layers)]
    return [str(x) for x in pattern]


class CachedAttention:
    name = ""
    cache_names = ()  # attributes holding the cache tensors

    def __init__(self, attn: torch.nn.Module, layer: int, config, options: dict):
        self.attn, self.layer = attn, layer
        self.kernel = "auto"  # decode attention kernel asked for (decode_kernels.KERNELS); the engine sets it
        self.kernel_used = None  # the one that ran at the last step

    def slots(self, max_len: int) -> int:
        """Positions this layer keeps for a decode of ``max_len`` positions."""
        return max_len

    def allocate(self, batch: int, max_len: int, device, dtype) -> None:
        """Zeroed cache tensors for ``batch`` sequences (zeros: a masked slot times its value must be 0, not NaN)."""
        raise NotImplementedError

    def cache_tensors(self) -> List[torch.Tensor]:
        return [getattr(self, name) for name in self.cache_names]

    def release(self) -> None:
        for name in self.cache_names:
            setattr(self, name, None)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache_tensors())

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _attend(self, q, k, v, pos, scale, sinks=None):
        """decode_kernels.cached_attention with this layer's kernel; remembers which one ran."""
        out, self.kernel_used = cached_attention(q, k, v, pos, scale, sinks, self.kernel)
        return out
