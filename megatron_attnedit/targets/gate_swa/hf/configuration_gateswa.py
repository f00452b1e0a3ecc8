"""GateSWA configuration (megatron-attnedit): a Qwen3 / Qwen3-MoE / Llama config plus the attention edit.

Fields beyond the base config:
  layer_types      per layer "sliding_attention" (window of ``sliding_window`` keys, itself
                   included) or "full_attention"; ``use_sliding_window`` is true
  output_gate      "head" (one gate value per head) or "channel" (one per head channel)
  attention_sinks  true: one learnable sink logit per head (a virtual key whose value is zero)
"""

from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

_GATES = ("head", "channel")


def _check(config):
    if config.output_gate not in _GATES:
        raise ValueError(f"output_gate must be one of {_GATES}, got {config.output_gate!r}")
    if config.layer_types is None or len(config.layer_types) != config.num_hidden_layers:
        raise ValueError("layer_types must list one entry per layer")
    if "sliding_attention" in config.layer_types and config.sliding_window is None:
        raise ValueError("sliding layers need use_sliding_window: true and a sliding_window")


class GateSWAConfig(Qwen3Config):
    model_type = "qwen3_gateswa"
    output_gate: str = "head"
    attention_sinks: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check(self)


class GateSWAMoeConfig(Qwen3MoeConfig):
    model_type = "qwen3_moe_gateswa"
    output_gate: str = "head"
    attention_sinks: bool = False
    layer_types: list | None = None  # Qwen3-MoE has no per-layer attention types of its own

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check(self)


class GateSWALlamaConfig(LlamaConfig):
    model_type = "llama_gateswa"
    output_gate: str = "head"
    attention_sinks: bool = False
    layer_types: list | None = None  # Llama has no per-layer attention types of its own
    sliding_window: int | None = None
    use_sliding_window: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check(self)
