"""GateSWA configuration (megatron-attnedit): a Qwen3 / Qwen3-MoE / Llama config plus the attention edit.

Fields beyond the base config:
  layer_types      per layer "sliding_attention" (window of ``sliding_window`` keys, itself
                   included) or "full_attention"; ``use_sliding_window`` is true
  output_gate      "head" (one gate value per head) or "channel" (one per head channel)
  attention_sinks  true: one learnable sink logit per head (a virtual key whose value is zero)
"""

from dataclasses import dataclass

from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

_GATES = ("head", "channel")


# transformers makes every config class a dataclass and takes fields only from dataclass bases:
# so is this mixin, which goes first among the bases (its __post_init__ runs the base's, then checks).
@dataclass(init=False, repr=False, eq=False, kw_only=True)
class _GateSWAFields:
    output_gate: str = "head"
    attention_sinks: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.output_gate not in _GATES:
            raise ValueError(f"output_gate must be one of {_GATES}, got {self.output_gate!r}")
        if self.layer_types is None or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must list one entry per layer")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("sliding layers need use_sliding_window: true and a sliding_window")


class GateSWAConfig(_GateSWAFields, Qwen3Config):
    model_type = "qwen3_gateswa"


class GateSWAMoeConfig(_GateSWAFields, Qwen3MoeConfig):
    model_type = "qwen3_moe_gateswa"
    layer_types: list | None = None  # Qwen3-MoE has no per-layer attention types of its own


class GateSWALlamaConfig(_GateSWAFields, LlamaConfig):
    model_type = "llama_gateswa"
    layer_types: list | None = None  # Llama has no per-layer attention types of its own
    sliding_window: int | None = None
    use_sliding_window: bool = False
