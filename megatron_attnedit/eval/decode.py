"""Greedy decode with a KV cache: decode tokens/s and the cache it leaves behind.

One prompt (batch 1), a prefill step, then ``new_tokens`` single-token steps; decode tokens/s
counts those steps only (the prefill is timed apart). The same loop drives a stock HF model
(``hf_step``, its own cache object) and the absorbed MLA decode (``mla_decode.AbsorbedMLA``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, List

import torch


@dataclasses.dataclass
class DecodeResult:
    tokens: torch.Tensor  # [1, prompt + new_tokens + 1]: the prompt and every generated token
    step_logits: torch.Tensor  # [new_tokens + 1, vocab]: the logits each token was chosen from
    cache: object  # the cache after the last step (holds prompt + new_tokens positions)
    prompt_len: int
    prefill_s: float
    decode_s: float

    @property
    def new_tokens(self) -> int:
        return self.step_logits.shape[0] - 1

    @property
    def cached_tokens(self) -> int:
        """Positions whose keys/values were computed (the last generated token is never fed)."""
        return self.prompt_len + self.new_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def greedy_decode(step: Callable, cache, prompt: torch.Tensor, new_tokens: int) -> DecodeResult:
    """``step(ids [1, s], cache) -> logits [1, s, vocab]`` extends ``cache`` in place."""
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    logits = step(prompt, cache)[:, -1].float()
    _sync(device)
    t1 = time.perf_counter()
    out: List[torch.Tensor] = [logits]
    ids = [logits.argmax(-1, keepdim=True)]
    for _ in range(new_tokens):
        logits = step(ids[-1], cache)[:, -1].float()
        out.append(logits)
        ids.append(logits.argmax(-1, keepdim=True))
    _sync(device)
    t2 = time.perf_counter()
    return DecodeResult(
        tokens=torch.cat([prompt] + ids, dim=1),
        step_logits=torch.cat(out, dim=0),
        cache=cache,
        prompt_len=prompt.shape[1],
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
    )


def hf_cache(model):
    """The cache transformers would make for ``model`` (sliding layers keep a window only)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def hf_step(model) -> Callable:
    def step(ids, cache):
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    return step
