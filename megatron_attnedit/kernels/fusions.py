"""Fused elementwise kernels for megatron-core's local spec (``model.kernel_fusion``).

Without transformer-engine and apex, the local spec runs RoPE, MLA's query/key assembly and SwiGLU
op by op: every ``cat``, ``mul`` and ``add`` is its own kernel with its own bf16 (or fp32) intermediate in
HBM, forward and backward. Each of them becomes one inductor-generated kernel per direction:
RoPE on every CUDA run (``fixes.rope_fusion``), the others with ``model.kernel_fusion`` (on by default
for CUDA with the local spec):

* **RoPE**: ``fixes.rope_fusion`` (CUDA platform start-up) replaces megatron's unfused
  ``rope_utils._apply_rotary_pos_emb_bshd`` --
  looked up at call time by ``apply_rotary_pos_emb``, for GQA and MLA alike -- with ``rope_bshd``
  compiled for CUDA tensors (``DEVICES``; the original runs for every other tensor). The CUDA
  profile of a stage-1 step at Qwen3-8B shape had 8.5% of its kernel time in RoPE's ``cat`` copies.
* **MLA's query/key assembly**: ``mla_qkv`` -- RoPE on the query's and the shared key's RoPE parts,
  the ``cat`` of each with its no-RoPE part, the value split -- as one kernel each way
  (``attention/mla.py``'s ``FusedMLASelfAttention``); megatron's ``cat`` and ``contiguous`` copies
  took 9.4% of a stage-1 step's kernel time after the RoPE fusion.
* **SwiGLU**: megatron's own ``bias_activation_fusion`` (``fusions/fused_bias_swiglu.py``, compiled
  by megatron's ``jit_fuser``, torch.compile) for the dense MLP; the grouped-GEMM experts call
  ``glu_times_probs`` here (the router probability multiplied in the same kernel).

The functions below are written so that each compiles to one pointwise kernel; run eagerly they are
op for op the formulas they replace. ``tests/test_fusions.py`` compiles them on the CPU and checks
them against megatron's unfused code: fp32 to 1e-6, bf16 no further from an fp64 reference than
the unfused bf16 result is (inductor keeps fp32 inside the kernel where eager rounds every op).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

_COMPILED: Dict[Callable, Callable] = {}
DEVICES = {"cuda"}  # device types whose tensors take the compiled functions (tests add "cpu")


def compiles(x: torch.Tensor) -> bool:
    """Whether functions of ``x`` run compiled (installed fusions on an accelerator that inductor
    generates kernels for; elsewhere the unfused code runs)."""
    return x.device.type in DEVICES


def compiled(fn: Callable) -> Callable:
    """``fn`` under torch.compile, one wrapper per function. Shapes are automatic-dynamic: the
    first call specialises, a second shape (the teacher's keys after its queries, the experts'
    varying token counts) recompiles once with symbolic sizes instead of once per shape."""
    c = _COMPILED.get(fn)
    if c is None:
        c = _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return c


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


def rope_bshd(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False, multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
    """megatron's ``_apply_rotary_pos_emb_bshd``: ``t`` ``[s, b, n, d]``, ``freqs`` ``[s, 1, 1, r]``
    (r <= d; the last d - r channels pass through). MLA's RoPE part is stored pair-interleaved and
    de-interleaved first; ``rotary_interleaved`` rotates adjacent pairs instead of halves."""
    r = freqs.shape[-1]
    x, rest = t[..., :r], t[..., r:]
    if multi_latent_attention:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    cos = (torch.cos(freqs) * mscale).to(t.dtype)
    sin = (torch.sin(freqs) * mscale).to(t.dtype)
    if rotary_interleaved:
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        first, second = torch.chunk(x, 2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
    out = x * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


UNFUSED: Dict[str, Callable] = {}  # megatron's own functions, kept by fixes.rope_fusion


def rope_dispatch(t, freqs, rotary_interleaved=False, mscale=1.0, **mla):
    """What ``fixes.rope_fusion`` puts in place of megatron's ``_apply_rotary_pos_emb_bshd``.
    ``mla``: megatron's flag for MLA's pair-interleaved RoPE part -- ``multi_latent_attention`` in
    megatron-core 0.16, ``mla_rotary_interleaved`` from 0.17 on -- handed to megatron's own function
    under the name its caller used."""
    if not compiles(t):
        return UNFUSED["rope"](t, freqs, rotary_interleaved=rotary_interleaved, mscale=mscale, **mla)
    interleaved = bool(mla.get("mla_rotary_interleaved") or mla.get("multi_latent_attention"))
    return compiled(rope_bshd)(t, freqs, rotary_interleaved=rotary_interleaved, multi_latent_attention=interleaved, mscale=mscale)


def installed() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils._apply_rotary_pos_emb_bshd is rope_dispatch


# ------------------------------------------------------------------------------------------------
# SwiGLU of the grouped-GEMM experts
# ------------------------------------------------------------------------------------------------


def glu_times_probs(h: torch.Tensor, probs: torch.Tensor, activation: Callable = F.silu, clamp: Optional[float] = None, offset: float = 0.0) -> torch.Tensor:
    """``activation(gate) * (up + offset)`` times the router probability (in the probability's
    dtype, then back to the activation's): megatron MLP's unfused GLU with its optional clamp,
    ``h`` = ``[tokens, 2 * ffn]`` as ``[gate | up]``, ``probs`` ``[tokens, 1]``."""
    gate, up = torch.chunk(h, 2, dim=-1)
    if clamp is not None:
        gate = gate.clamp(min=None, max=clamp)
        up = up.clamp(min=-clamp, max=clamp)
    a = activation(gate) * (up + offset)
    return (a * probs).to(a.dtype)


# ------------------------------------------------------------------------------------------------
# MLA: query, key and value from the up-projections
# ------------------------------------------------------------------------------------------------


def mla_qkv(q: torch.Tensor, kv: torch.Tensor, k_pos_emb: torch.Tensor, freqs: torch.Tensor, qk_head_dim: int, v_head_dim: int, rotary_interleaved: bool = False):
    """megatron MLA's up-projection tail: ``q`` ``[s, b, n, qk + dr]``, ``kv`` ``[s, b, n, qk + v]``,
    ``k_pos_emb`` ``[s, b, 1, dr]`` (the shared RoPE key, pair-interleaved like the query's RoPE
    part), ``freqs`` ``[s, 1, 1, dr]`` -> (query ``[s, b, n, qk + dr]``, key ``[s, b, n, qk + dr]``,
    value ``[s, b, n, v]``), contiguous."""
    n = q.shape[-2]
    q_nope, q_pe = torch.split(q, [qk_head_dim, q.shape[-1] - qk_head_dim], dim=-1)
    k_nope, value = torch.split(kv, [qk_head_dim, v_head_dim], dim=-1)
    q_pe = rope_bshd(q_pe, freqs, rotary_interleaved, multi_latent_attention=True)
    k_pe = rope_bshd(k_pos_emb, freqs, rotary_interleaved, multi_latent_attention=True).expand(-1, -1, n, -1)
    return torch.cat((q_nope, q_pe), dim=-1), torch.cat((k_nope, k_pe), dim=-1), value.contiguous()
