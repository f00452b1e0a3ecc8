"""DecodeEngine: the family-neutral runner -- static caches, batched prefill, greedy decode steps.

    engine = DecodeEngine(model, batch=2, max_len=prompt_len + steps)
    out = engine.generate(prompt_ids, steps)      # tokens, the logits of every step, timings

The model is a loaded transformers causal LM whose body is ``model.model`` with ``embed_tokens``,
``layers[i].{input_layernorm, self_attn, post_attention_layernorm, mlp}``, ``norm``, ``rotary_emb``
and ``model.lm_head`` (Qwen3, Qwen3-MoE, DeepSeek-V2/V3, the GateSWA export). The attention of every
layer is the registered kind of the model's attention target (inference/__init__.py); the rest are
the model's own modules, called as they are (a MoE block's router and experts included).

Prefill: one pass over the prompt, attention over the whole prompt; the MLP runs on chunks of
``prefill_chunk`` tokens (a 128K-token prompt's MLP intermediates would otherwise take tens of GB);
logits only for the last position. Decode step: one token per sequence at the device position
``pos``; it reads nothing on the host, so on CUDA the whole step (every layer, the head and the
greedy argmax) is captured once as a CUDA graph and replayed (``cuda_graphs``; launching a few
hundred small kernels per token otherwise dominates a decode at batch 1). Every sequence of a batch
is at the same position (prompts of one length).
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional

import torch

from megatron_attnedit.inference import attention_of, get_kind
from megatron_attnedit.errors import EvalError
from megatron_attnedit.attention.rope_tables import RopeTable


@dataclasses.dataclass
class Decode:
    tokens: torch.Tensor  # [b, prompt + steps + 1]: the prompt and every generated token
    step_logits: Optional[torch.Tensor]  # [steps + 1, b, vocab] fp32: the logits each token was chosen from
    prompt_len: int
    prefill_s: float
    decode_s: float

    @property
    def steps(self) -> int:
        return self.tokens.shape[1] - self.prompt_len - 1

    @property
    def positions(self) -> int:
        """Positions cached (the last generated token is never fed back)."""
        return self.prompt_len + self.steps

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens/s over all sequences of the batch (the prefill is timed apart)."""
        n = self.steps * self.tokens.shape[0]
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DecodeEngine:
    def __init__(self, model, batch: int, max_len: int, cuda_graphs: Optional[bool] = None, prefill_chunk: int = 8192,
                 attention_kernel: str = "auto"):
        self.model, self.body, cfg = model, model.model, model.config
        self.attention, self.options = attention_of(cfg.to_dict())
        kind = get_kind(self.attention)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.layers = list(self.body.layers)
        self.kinds = [kind(layer.self_attn, i, cfg, self.options) for i, layer in enumerate(self.layers)]
        for k in self.kinds:  # decode attention: the one-pass Triton kernel on a GPU, the matmul path elsewhere
            k.kernel = attention_kernel
        self.max_len, self.prefill_chunk = int(max_len), int(prefill_chunk)
        self.rope = RopeTable(self.body.rotary_emb, self.max_len, self.device)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.graph_error: Optional[str] = None  # why the step runs eagerly although graphs were asked for
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = 0  # host mirror of pos
        self.batch = 0
        self._graph = self._ids = self._logits = None
        self.allocate(batch)

    # -- cache ---------------------------------------------------------------------------------
    def allocate(self, batch: int, source: Optional[List[List[torch.Tensor]]] = None) -> None:
        """(Re)allocate every layer's cache for ``batch`` sequences, at position 0. With ``source``
        (``caches()`` of an earlier allocation of the same length) every new sequence is a copy of
        the source's first one and the position is kept: a whole batch at a long context without
        prefilling each sequence (the benchmark's largest batch)."""
        self.release()
        for kind in self.kinds:
            kind.allocate(batch, self.max_len, self.device, self.dtype)
        self.batch = batch
        if source is None:
            self.reset()
            return
        for kind, theirs in zip(self.kinds, source):
            for mine, t in zip(kind.cache_tensors(), theirs):
                mine[:1].copy_(t[:1])  # the source may sit in host memory (the benchmark frees the device for the batch)
                if batch > 1:
                    mine[1:].copy_(mine[:1].expand_as(mine[1:]))

    def caches(self) -> List[List[torch.Tensor]]:
        """The cache tensors of every layer (references: they stay alive while held)."""
        return [kind.cache_tensors() for kind in self.kinds]

    def release(self) -> None:
        """Drop the caches (and the captured step that uses them)."""
        self._graph = self._ids = self._logits = None
        for kind in self.kinds:
            kind.release()
        self.batch = 0

    def reset(self, position: int = 0) -> None:
        """Continue from ``position``. Slots past it keep what they hold until rewritten (rewinding
        a ring buffer leaves it stale: for timing only)."""
        self.length = position
        self.pos.fill_(position)

    def kernels_used(self) -> List[str]:
        """The decode attention kernels the layers ran at their last step, each named once (none
        before any step)."""
        return sorted({k.kernel_used for k in self.kinds if k.kernel_used})

    def cache_bytes_per_layer(self) -> List[int]:
        """Bytes of the tensors each layer's cache holds (allocated for ``batch`` x its slots)."""
        return [kind.cache_bytes() for kind in self.kinds]

    # -- forward -------------------------------------------------------------------------------
    def _mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        out = layer.mlp(layer.post_attention_layernorm(h))
        return out[0] if isinstance(out, tuple) else out  # some MoE blocks also return router logits

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.body.norm(h[:, -1:]))[:, -1].float()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, vocab] (fp32) after ``ids`` [batch, s], the prompt from position 0."""
        b, s = ids.shape
        if b != self.batch or s > self.max_len:
            raise EvalError(f"prefill of {b} x {s} tokens does not fit a cache of {self.batch} x {self.max_len}")
        cos, sin = self.rope.rows(torch.arange(s, device=self.device))
        h = self.body.embed_tokens(ids)
        for layer, kind in zip(self.layers, self.kinds):
            h = h + kind.prefill(layer.input_layernorm(h), cos, sin)
            for i in range(0, s, self.prefill_chunk):  # token-wise: chunks bound the MLP's intermediates
                part = h[:, i : i + self.prefill_chunk].contiguous()
                h[:, i : i + self.prefill_chunk] = part + self._mlp(layer, part)
        self.length = s
        self.pos.fill_(s)
        return self._head(h)

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope.rows(self.pos)
        h = self.body.embed_tokens(ids)
        for layer, kind in zip(self.layers, self.kinds):
            h = h + kind.step(layer.input_layernorm(h), self.pos, cos, sin)
            h = h + self._mlp(layer, h)
        self.pos.add_(1)
        return self._head(h)

    def _capture(self) -> None:
        self._ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        start = self.pos.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (allocator, lazy inits) off the capture; the slot written is rewritten by the real step
            for _ in range(2):
                self._step(self._ids)
                self.pos.copy_(start)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.empty_cache()  # the warm-up's blocks back to the device: the graph's own pool needs them again
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step(self._ids)
        self.pos.copy_(start)
        self._graph = graph

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, vocab] (fp32) after one more token per sequence, ``ids`` [batch, 1]."""
        if self.length >= self.max_len:
            raise EvalError(f"the cache holds {self.max_len} positions; allocate a longer one to decode further")
        self.length += 1
        if not self.cuda_graphs:
            return self._step(ids)
        if self._graph is None:
            try:
                self._capture()
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # an op of this model that a graph cannot hold (a host sync): run eagerly
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                self.cuda_graphs = False
                self.pos.fill_(self.length - 1)
                return self._step(ids)
        self._ids.copy_(ids)
        self._graph.replay()
        return self._logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int, keep_logits: bool = True) -> Decode:
        """Greedy decode: prefill ``prompt`` [batch, s], then ``steps`` single-token steps."""
        if prompt.shape[1] + steps > self.max_len:
            raise EvalError(f"{prompt.shape[1]} prompt + {steps} decoded positions exceed the cache's {self.max_len}")
        self.reset()
        synchronize(self.device)
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        synchronize(self.device)
        t1 = time.perf_counter()
        ids = [logits.argmax(-1, keepdim=True)]
        kept = [logits] if keep_logits else []
        for _ in range(steps):
            logits = self.step(ids[-1])
            ids.append(logits.argmax(-1, keepdim=True))
            if keep_logits:
                kept.append(logits.clone())
        synchronize(self.device)
        t2 = time.perf_counter()
        return Decode(tokens=torch.cat([prompt] + ids, dim=1), step_logits=torch.stack(kept) if keep_logits else None,
                      prompt_len=prompt.shape[1], prefill_s=t1 - t0, decode_s=t2 - t1)

    @torch.no_grad()
    def time_steps(self, steps: int, warmup: int = 2) -> float:
        """Seconds per decode step from the current position (greedy, tokens fed back on the device)."""
        if self.length + warmup + steps > self.max_len:
            raise EvalError(f"{warmup + steps} more steps from position {self.length} exceed the cache's {self.max_len}")
        ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        for _ in range(warmup):
            ids = self.step(ids).argmax(-1, keepdim=True)
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            ids = self.step(ids).argmax(-1, keepdim=True)
        synchronize(self.device)
        return (time.perf_counter() - t0) / steps
