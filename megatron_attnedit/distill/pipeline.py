"""Losses that live on every pipeline stage, inside megatron's 1F1B schedule.

megatron's schedule calls the loss function on the last stage only; earlier stages back-propagate
the gradient their output tensor receives from the next stage. Distillation has losses on every
stage (stage 1: each stage's layers; stage 2: feature matching at chosen layers), so each stage's
local loss must get the same gradient scale as the last stage's loss (1 / micro-batches, times the
fp16 loss scale if any) without any extra communication.

The trick: one element of the pipeline tensor -- flat index 0, which always belongs to a part of
the tensor that carries no gradient of its own (the teacher's hidden state) -- is a gradient
carrier.

* A receiving stage adds ``anchor(input_tensor)`` (value 0) to its local loss: whatever gradient
  reaches that loss is written into element 0 of the input tensor's gradient, which megatron sends
  back to the previous stage.
* A sending stage wraps its output as ``carry(output, local_loss)`` (value unchanged): in backward
  the gradient arriving in element 0 of its output is handed to its local loss.

On the last stage the schedule's own loss gradient starts the chain, so every stage's local loss
receives exactly the last stage's scale. The first stage has no input tensor and no anchor.
"""

from __future__ import annotations

from typing import Optional

import torch


class _Carry(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, loss):
        ctx.output_needs_grad = output.requires_grad
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        grad_loss = grad.reshape(-1)[0].to(torch.float32)
        return (grad if ctx.output_needs_grad else None), grad_loss


def carry(output: torch.Tensor, local_loss: torch.Tensor) -> torch.Tensor:
    """``output`` unchanged in value; in backward, element 0 of its gradient becomes ``local_loss``'s."""
    return _Carry.apply(output, local_loss)


def anchor(input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
    """0 (a scalar) whose gradient lands in element 0 of ``input_tensor`` (None on the first stage)."""
    if input_tensor is None:
        return torch.zeros(())
    x = input_tensor.reshape(-1)[0].float()
    return x - x.detach()
