"""Llama 3 (``llama``, transformers' ``LlamaConfig`` / ``LlamaForCausalLM``).

Attention quirks: no q/k-norm (queries and keys go to RoPE as projected, so the MLA target's svd
initializer has no norm to linearise); RoPE with ``rope_type: llama3`` (Llama 3.1's smooth scaling
of the low frequencies: ``base.rope_inv_freq``) or plain; GQA; tied (Llama 3.2 1B/3B) or untied
embeddings. Llama's ``attention_bias`` adds a bias to o_proj as well, and ``mlp_bias`` to the MLP:
neither has a rule here (Llama 3 has neither), so both are refused.

Presets: Llama-3.1-8B's public config and a debug preset of the tests' size.
"""

from typing import Dict

from megatron_attnedit.families.base import Family

_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

PRESETS: Dict[str, dict] = {
    "llama3.1-8b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=32, hidden_size=4096,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        tie_word_embeddings=False, rope_parameters=dict(_LLAMA3_ROPE, rope_theta=500000.0), rms_norm_eps=1e-5,
        max_position_embeddings=131072, attention_bias=False, mlp_bias=False, hidden_act="silu", torch_dtype="bfloat16",
    ),
    "llama3-debug": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=4, hidden_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
        tie_word_embeddings=True, rope_parameters=dict(_LLAMA3_ROPE, original_max_position_embeddings=64, rope_theta=500000.0),
        rms_norm_eps=1e-5, max_position_embeddings=512, attention_bias=False, mlp_bias=False, hidden_act="silu",
        torch_dtype="float32",
    ),
}

LLAMA = Family(
    model_type="llama", architecture="LlamaForCausalLM", qk_norm=False, moe=False, rope_types=("default", "llama3"),
    presets=PRESETS, refused=(("attention_bias", "o_proj would carry a bias, which has no rule here"), ("mlp_bias", "the MLP would carry biases")),
)
