"""Declarative HF <-> megatron mapping, read both ways.

A table is a list of ``Rule``: a megatron parameter name pattern (as in the *module* state dict of
the local spec, layers and experts by their global index), the HF tensor names it is made of, a
named transform, and how tensor parallelism splits it. ``{L}`` stands for the global layer index,
``{E}`` for the global expert index. Family tables live beside this file (``qwen3.py``); attention
targets add their own rules for their attention parameters.

Transforms (each one an exact inverse pair, so round trips are bit-exact):
  copy      one HF tensor, unchanged
  qkv       q, k, v projections fused per query group: rows [q_1..q_{h/g}, k, v] for each group
  gate_up   gate and up projections stacked: [gate; up]
  vocab     embedding / output rows, padded with zeros to the padded vocabulary

TP split kinds:
  None      replicated
  0 / 1     contiguous split along that dim (column- / row-parallel)
  gate_up   split along dim 0 within each half, so a shard is [gate_r; up_r]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch


@dataclasses.dataclass(frozen=True)
class Rule:
    megatron: str
    hf: Tuple[str, ...]
    transform: str = "copy"
    tp_split: Union[None, int, str] = None
    expert: bool = False  # one rule instance per routed expert (EP splits these)

    def megatron_regex(self) -> "re.Pattern":
        pat = re.escape(self.megatron).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
        return re.compile("^" + pat + "$")

    def format(self, layer: Optional[int] = None, expert: Optional[int] = None) -> Tuple[str, Tuple[str, ...]]:
        f = lambda s: s.replace("{L}", str(layer)).replace("{E}", str(expert))
        return f(self.megatron), tuple(f(h) for h in self.hf)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the transforms need to know about the model."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


def to_megatron(rule: Rule, hf: Sequence[torch.Tensor], s: Shapes) -> torch.Tensor:
    t = rule.transform
    if t == "copy":
        return hf[0]
    if t == "gate_up":
        return torch.cat([hf[0], hf[1]], dim=0)
    if t == "vocab":
        w = hf[0]
        if w.shape[0] == s.padded_vocab_size:
            return w
        pad = w.new_zeros((s.padded_vocab_size - w.shape[0],) + tuple(w.shape[1:]))
        return torch.cat([w, pad], dim=0)
    if t == "qkv":
        q, k, v = hf
        g, d = s.num_kv_heads, s.head_dim
        per = s.num_heads // g
        rest = q.shape[1:]
        q = q.reshape(g, per * d, *rest)
        k = k.reshape(g, d, *rest)
        v = v.reshape(g, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(g * (per + 2) * d, *rest)
    raise KeyError(f"unknown transform {t!r}")


def to_hf(rule: Rule, w: torch.Tensor, s: Shapes) -> List[torch.Tensor]:
    t = rule.transform
    if t == "copy":
        return [w]
    if t == "gate_up":
        return list(torch.chunk(w, 2, dim=0))
    if t == "vocab":
        return [w[: s.vocab_size]]
    if t == "qkv":
        g, d = s.num_kv_heads, s.head_dim
        per = s.num_heads // g
        rest = w.shape[1:]
        w = w.reshape(g, (per + 2) * d, *rest)
        q, k, v = torch.split(w, [per * d, d, d], dim=1)
        return [q.reshape(g * per * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)]
    raise KeyError(f"unknown transform {t!r}")


def tp_shard(rule: Rule, w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    if size == 1 or rule.tp_split is None:
        return w
    if rule.tp_split == "gate_up":
        gate, up = torch.chunk(w, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], dim=0)
    return torch.chunk(w, size, dim=rule.tp_split)[rank].contiguous()


def tp_unshard(rule: Rule, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1 or rule.tp_split is None:
        return shards[0]
    if rule.tp_split == "gate_up":
        halves = [torch.chunk(x, 2, dim=0) for x in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=rule.tp_split)


class Table:
    """A family's rules plus lookup by megatron name."""

    def __init__(self, rules: Sequence[Rule]):
        self.rules = list(rules)
        self._compiled = [(r, r.megatron_regex()) for r in self.rules]

    def match(self, megatron_name: str) -> Tuple[Rule, Optional[int], Optional[int]]:
        for rule, rx in self._compiled:
            m = rx.match(megatron_name)
            if m:
                gd = m.groupdict()
                return rule, _int(gd.get("L")), _int(gd.get("E"))
        raise KeyError(megatron_name)

    def expand(self, layers: Dict[int, Sequence[Rule]], top: Sequence[Rule], num_experts: Dict[int, int]):
        """(megatron name, hf names, rule) for every tensor of a model, in a stable order."""
        out = []
        for r in top:
            if "{L}" not in r.megatron:
                name, hf = r.format()
                out.append((name, hf, r))
        for layer, rules in sorted(layers.items()):
            for r in rules:
                if r.expert:
                    for e in range(num_experts.get(layer, 0)):
                        name, hf = r.format(layer, e)
                        out.append((name, hf, r))
                else:
                    name, hf = r.format(layer)
                    out.append((name, hf, r))
        return out


def _int(x):
    return None if x is None else int(x)


def hf_shapes_of(rule, shapes, megatron_shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    """HF tensor shapes a rule makes from a megatron tensor of this shape (meta device)."""
    return [tuple(t.shape) for t in to_hf(rule, torch.empty(megatron_shape, device="meta"), shapes)]
