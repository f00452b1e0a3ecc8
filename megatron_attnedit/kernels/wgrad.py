"""Weight gradients accumulated straight into megatron's fp32 main-grad buffers.

Without apex, megatron-core computes each linear layer's weight gradient as a bf16 GEMM and its DDP
hook then adds it to the fp32 ``main_grad`` buffer: a second pass over every weight per micro-batch,
and the gradient rounded to bf16 before it is accumulated. megatron's ``gradient_accumulation_fusion``
path instead calls apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output,
main_grad)``, one GEMM whose epilogue adds into the fp32 buffer. ``WgradAccumulation`` is that
interface on torch ops: ``torch.addmm(main_grad, dy^T, x, out_dtype=float32, out=main_grad)`` on CUDA
(torch >= 2.9), an fp32 ``addmm_`` elsewhere. ``fixes.wgrad_accumulation`` hands it to megatron's
tensor-parallel linear layers at platform start-up.

Measured on an H100 (launch/bench_wgrad.py, 4096 tokens): 1.18-1.30x faster per weight gradient at
Qwen3-8B shapes, and an error against fp64 of 0.002 instead of 1.0 (the bf16 rounding of the
gradient before accumulation).

``weight_grads_only`` (``fixes.dgrad_skip``, every platform): megatron's linear backward computes the
input gradient ``grad_output @ weight`` whether or not the input needs one (TE's linears check).
Stage 1 feeds each student attention the teacher's detached hidden state, so the query and latent
projections' input gradients -- 13% of the student's FLOPs at Qwen3-8B MLA shape -- were computed
and thrown away; stage 2's first layer likewise. Where autograd asks for no input gradient, the
backward now computes the weight (and bias) gradient only, through the same accumulation as above.
"""

from __future__ import annotations

import torch


class WgradAccumulation:
    """apex ``fused_weight_gradient_mlp_cuda``'s two entry points (megatron calls only these)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        x = total_input.reshape(-1, total_input.shape[-1])
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        if x.dtype == main_grad.dtype:
            main_grad.addmm_(dy.t(), x)
        elif main_grad.is_cuda:
            torch.addmm(main_grad, dy.t(), x, out_dtype=main_grad.dtype, out=main_grad)
        else:
            main_grad.addmm_(dy.t().to(main_grad.dtype), x.to(main_grad.dtype))

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        x = total_input.reshape(-1, total_input.shape[-1])
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        main_grad.addmm_(dy.t().to(main_grad.dtype), x.to(main_grad.dtype))


_PROBE: dict = {}


def supported(device: torch.device) -> bool:
    """Whether the fp32-accumulating bf16 GEMM runs on ``device`` (probed once; CPUs and fp32 models
    use the same-dtype addmm_, which always runs)."""
    if device.type != "cuda":
        return True
    if "cuda" not in _PROBE:
        try:
            g = torch.zeros(8, 8, device=device)
            a = torch.ones(16, 8, device=device, dtype=torch.bfloat16)
            WgradAccumulation.wgrad_gemm_accum_fp32(a, a, g)
            _PROBE["cuda"] = bool((g == 16).all())
        except (RuntimeError, TypeError):
            _PROBE["cuda"] = False
    return _PROBE["cuda"]


# ------------------------------------------------------------------------------------------------
# Backward without the unneeded input gradient
# ------------------------------------------------------------------------------------------------

MEGATRON_BACKWARD: dict = {}  # megatron's own backward, kept by fixes.dgrad_skip


def weight_grads_only(ctx, grad_output):
    """megatron's ``LinearWithGradAccumulationAndAsyncCommunication.backward`` for an input that
    needs no gradient, without sequence parallelism or deferred weight gradients (those -- and any
    input that needs a gradient -- take megatron's own backward): the same weight-gradient paths
    (fused accumulation into ``main_grad`` with megatron's dummy ``grad_weight``, or a plain GEMM)
    and bias gradient, ``None`` for the input."""
    from megatron.core.tensor_parallel import layers

    original = MEGATRON_BACKWARD["linear"]
    input, weight = ctx.saved_tensors
    # (megatron-core >= 0.17's weight sharding for recompute, gtp_remat_size, takes megatron's path too)
    if (ctx.needs_input_grad[0] or ctx.sequence_parallel or ctx.grad_output_buffer is not None or hasattr(weight, "__fsdp_param__")
            or getattr(ctx, "gtp_remat_size", 1) > 1):
        return original(ctx, grad_output)
    x = input.reshape(-1, input.shape[-1])
    dy = grad_output.reshape(-1, grad_output.shape[-1])
    if ctx.gradient_accumulation_fusion:
        weight.main_grad = ctx.main_grad
        if weight.main_grad.dtype == torch.float32:
            layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x, dy, weight.main_grad)
        else:
            layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(x, dy, weight.main_grad)
        grad_weight = None
        if hasattr(weight, "grad_added_to_main_grad"):  # megatron's dummy gradient, for its DDP hooks
            make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
            grad_weight = make(weight.main_grad.shape, dtype=input.dtype, device=input.device)
            weight.grad_added_to_main_grad = True
    else:
        grad_weight = dy.t().matmul(x)
    grad_bias = dy.sum(dim=0) if ctx.use_bias else None
    # one gradient per forward input: 9 in megatron-core 0.16.1, 10 in 0.19.2 (ctx.needs_input_grad has one per input)
    return (None, grad_weight, grad_bias) + (None,) * (len(ctx.needs_input_grad) - 3)
