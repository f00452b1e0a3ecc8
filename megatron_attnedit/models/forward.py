"""Forward-only helpers that work at any TP/PP layout (evaluation, parity checks)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, vocab_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, V] on the last pipeline stage (gathered over TP), None elsewhere.

    ``model`` is this rank's model (or a list of one); ``tokens`` [b, s] must be the same on
    every rank of a TP group. Under PP the 1F1B schedule runs a single micro-batch forward-only.
    """
    chunks = model if isinstance(model, list) else [model]
    for m in chunks:
        m.eval()
    b, s = tokens.shape
    out = {}

    def step(data_iter, m):
        toks = next(data_iter)
        logits = m(toks, position_ids(toks), None)

        def collect(output_tensor):
            out["logits"] = output_tensor
            return output_tensor.float().sum() * 0, {}

        return logits, collect

    fb = get_forward_backward_func()
    fb(
        forward_step_func=step,
        data_iterator=iter([tokens]),
        model=chunks,
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = out["logits"]
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits
