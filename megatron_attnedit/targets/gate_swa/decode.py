"""Kind "gate_swa": GateSWA layers -- sliding (ring buffer of W positions) or full (every position).

Per layer, as the exported model computes it (targets/gate_swa/hf/modeling_gateswa.py): the
teacher's projections, q/k-norms and RoPE; attention over the window (S layers: keys
p - W < j <= p) or every earlier key (F layers), softmax with the per-head sink logit when the
model has sinks; the attention output of each head times sigmoid(x W_g + b_g) -- one value per
head ("head" gate) or per channel ("channel") -- before o_proj. A model with sliding layers but no
gate or sinks (a stock Qwen3 config with ``layer_types``) runs here too, without them.

Which layers slide: the S/F pattern of the attention options (inference.attention_of, read from
the config's ``layer_types``). The cache of an S layer has min(W, max_len) slots: the W positions
the formula counts (GateSWATarget.kv_bytes_per_layer), never W - 1.
"""

from __future__ import annotations

import torch

from megatron_attnedit.attention.decode_base import per_layer
from megatron_attnedit.targets.gqa.decode import GQAAttention


class GateSWAAttention(GQAAttention):
    name = "gate_swa"

    def __init__(self, attn, layer, config, options):
        super().__init__(attn, layer, config, options)
        kinds = per_layer(options["pattern"], int(config.num_hidden_layers))
        self.window = int(options["window"]) if kinds[layer] == "S" else None
        self.sinks = getattr(attn, "sinks", None)
        self.gate = getattr(attn, "output_gate", None)

    def _output(self, o, x):
        o = o.transpose(1, 2)  # [b, s, heads, d]
        if self.gate is not None:
            o = o * torch.sigmoid(self.gate(x)).view(*x.shape[:2], self.heads, -1)  # [.., heads, 1 or d]
        return self.attn.o_proj(o.reshape(*x.shape[:2], -1))


ATTENTION = GateSWAAttention  # what the decode engine builds per layer
