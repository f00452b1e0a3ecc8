"""Qwen3 model shapes by name: the public configs (DESIGN.md section 5) and debug presets.

Plain dictionaries in Hugging Face ``config.json`` form, importable without megatron-core (the
decode benchmark runs where megatron-core is not installed). ``models.qwen3.config_for_preset``
returns a copy with a one-line error for an unknown name.
"""

from typing import Dict

# Public configs; only the fields the builder reads.
PRESETS: Dict[str, dict] = {
    "qwen3-8b": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=36, hidden_size=4096,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
        vocab_size=151936, tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, attention_bias=False, hidden_act="silu", torch_dtype="bfloat16",
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=48, hidden_size=2048,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, vocab_size=151936,
        tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
        attention_bias=False, hidden_act="silu", torch_dtype="bfloat16",
    ),
    # Debug presets: same structure, toy sizes (used by the tests).
    "qwen3-debug": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=4, hidden_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
        attention_bias=False, hidden_act="silu", torch_dtype="float32",
    ),
    "qwen3-moe-debug": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=4, hidden_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[0], router_aux_loss_coef=0.001, vocab_size=256,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
        attention_bias=False, hidden_act="silu", torch_dtype="float32",
    ),
}
