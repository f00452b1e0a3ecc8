"""GateSWA: gated sliding-window attention with a hybrid layer pattern (DESIGN.md section 4).

Per layer, on top of the teacher's attention (Q/K/V/O, q/k-norm if the family has one, RoPE
inherited unchanged): sliding-window causal attention, query i sees keys i-W < j <= i ("S"
layers), or full causal attention ("F" layers), from a pattern string tiled over the layers
("SSSSSF"), an explicit per-layer list, or ``auto:K`` (chosen on calibration tokens, model.py);
an output gate ``o_h <- o_h * 2 sigmoid(x W_g + b_g)_h`` per head or per channel; optional
learnable per-head sink logits. A sliding layer caches min(W, context) positions.

This file: the options, layer kinds, KV formula, FLOP count, recognition of an export, and the
warning a run on sequences no longer than the window gets. model.py: the gated attention module
and the initializer on megatron-core; export.py + hf/: the shipped remote code; decode.py: the
ring-buffer decode.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple, Union

from megatron_attnedit.errors import ConfigError
from megatron_attnedit.targets.base import AttentionTarget, LayerFlops, check_int, expand_pattern, gqa_layer_bytes, gqa_layer_flops


@dataclasses.dataclass(frozen=True)
class GateSWAOptions:
    window: int = 4096  # keys per query in S layers (itself included)
    pattern: Union[str, Sequence[str]] = "SSSSSF"  # tiled string, per-layer list, or auto:K
    gate: str = "head"  # head | channel
    sinks: bool = False  # learnable per-head sink logits
    sink_init: float = -20.0  # start value of the sink logits (-20: no effect at start)
    kinds: Tuple[str, ...] = dataclasses.field(default=(), metadata={"derived": True})  # empty while the pattern is auto:K


def is_auto(pattern) -> bool:
    return isinstance(pattern, str) and pattern.startswith("auto:")


class GateSWATarget(AttentionTarget):
    name = "gate_swa"
    title = "GateSWA"
    Options = GateSWAOptions
    KINDS = {"S": "sliding window", "F": "full attention"}
    weight_markers = ("linear_gate", "softmax_offset")

    def resolve(self, hf_cfg: dict, options: dict) -> GateSWAOptions:
        o = super().resolve(hf_cfg, options)
        check_int(o, "window", 1, why=" (the number of keys a query sees, itself included)")
        if o.gate not in ("head", "channel"):
            raise ConfigError(f"gate {o.gate!r} is unknown; use head or channel")
        if not isinstance(o.sinks, bool):
            raise ConfigError(f"sinks must be true or false, got {o.sinks!r}")
        n = hf_cfg["num_hidden_layers"]
        if is_auto(o.pattern):
            k = o.pattern[5:]
            if not k.isdigit() or not (0 <= int(k) <= n):
                raise ConfigError(f"pattern {o.pattern!r}: K in auto:K must be an integer in [0, {n}]")
            return o
        return dataclasses.replace(o, kinds=tuple(expand_pattern(o.pattern, n, self.KINDS)))

    def layer_kinds(self, hf_cfg, options) -> List[str]:
        o = self.resolve(hf_cfg, options)
        if is_auto(o.pattern):
            raise ConfigError(
                f"pattern {o.pattern} is chosen from calibration data: resolve it with "
                "gate_swa.model.resolve_auto_pattern(teacher, tokens, target) before building the student"
            )
        return list(o.kinds)

    def kv_bytes_per_layer(self, hf_cfg, options, context, bytes_per_elem=2):
        # A sliding layer caches the last W tokens only: averaged over a context of C tokens.
        if context < 1:
            raise ValueError(f"context must be at least one token, got {context}")
        window = self.resolve(hf_cfg, options).window
        per_layer = float(gqa_layer_bytes(hf_cfg, bytes_per_elem))
        share = min(window, context) / context
        return [per_layer * share if k == "S" else per_layer for k in self.layer_kinds(hf_cfg, options)]

    def flops(self, hf_cfg, options, seq) -> List[LayerFlops]:
        o = self.resolve(hf_cfg, options)
        d = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // hf_cfg["num_attention_heads"]
        gate = 2 * hf_cfg["hidden_size"] * hf_cfg["num_attention_heads"] * (d if o.gate == "channel" else 1)
        return [gqa_layer_flops(hf_cfg, seq, o.window if k == "S" else None, extra_proj=gate) for k in self.layer_kinds(hf_cfg, options)]

    def describe(self, hf_cfg, options) -> str:
        pattern = options.get("pattern", GateSWAOptions.pattern)
        kinds = "".join(pattern) if isinstance(pattern, (list, tuple)) else str(pattern)
        return f"GateSWA W={options.get('window', GateSWAOptions.window)} {kinds}"

    def recognise(self, cfg):
        types, window = cfg.get("layer_types"), cfg.get("sliding_window")
        gateswa = str(cfg.get("model_type")).endswith("_gateswa")  # the project's export, even with no sliding layer
        if isinstance(types, list) and window and ("sliding_attention" in types or gateswa):
            return dict(window=int(window), pattern=["S" if t == "sliding_attention" else "F" for t in types])
        return None

    def attention_window(self, options):
        return int(options.get("window", GateSWAOptions.window))

    def run_warnings(self, hf_cfg, options, seq_length):
        window = self.resolve(hf_cfg, options).window
        if window < seq_length:
            return []
        return [f"target.options.window={window} >= data.seq_length={seq_length}: every sliding-window layer sees the "
                "whole sequence, so the student equals the teacher and has nothing to learn; train on sequences longer than "
                "the window (the GateSWA recipes use twice it)"]
