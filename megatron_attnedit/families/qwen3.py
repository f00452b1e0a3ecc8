"""Qwen3 (``qwen3``) and Qwen3-MoE (``qwen3_moe``): the families the project was built on.

Attention quirks: every query and key head is RMS-normalised before RoPE (``qk_norm``: the MLA
target's svd initializer folds it into a constant per head, GateSWA keeps it); q/k/v biases only
when ``attention_bias`` (Qwen3 has none); plain RoPE (no scaling). Qwen3-MoE: softmax router over
all experts, top-k, renormalised iff ``norm_topk_prob``; ``decoder_sparse_step`` and
``mlp_only_layers`` pick the dense layers.

Presets: the public configs (DESIGN.md section 5) and debug presets, plain dictionaries in Hugging
Face ``config.json`` form (only the fields the builder reads).
"""

from typing import Dict

from megatron_attnedit.families.base import Family

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


QWEN3 = Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM", qk_norm=True, moe=False,
    presets={k: v for k, v in PRESETS.items() if v["model_type"] == "qwen3"},
)
QWEN3_MOE = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", qk_norm=True, moe=True,
    presets={k: v for k, v in PRESETS.items() if v["model_type"] == "qwen3_moe"},
)
