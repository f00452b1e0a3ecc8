"""The evaluation's KV summary: bytes of the decode engine's allocated cache against the attention
targets' formula on the teacher's config, per layer (random weights, fp32, CPU). The engine's decode
itself is tested against transformers in test_inference.py."""

import torch

from megatron_attnedit.eval import kv_measure
from megatron_attnedit.inference.engine import DecodeEngine

# MLA student of the qwen3-debug teacher (hidden 64, 4 heads x 16, 4 layers, vocab 256).
MLA_SHAPE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1, tie_word_embeddings=False,
)


def make_deepseek(version: int, q_lora_rank=None, seed: int = 0, **over):
    """A random DeepSeek-V2/V3 model; layers from 2 on are MoE (V3 sigmoid router, V2 softmax)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    cfg_cls, model_cls = (DeepseekV2Config, DeepseekV2ForCausalLM) if version == 2 else (DeepseekV3Config, DeepseekV3ForCausalLM)
    cfg = cfg_cls(q_lora_rank=q_lora_rank, first_k_dense_replace=2, **dict(MLA_SHAPE, **over))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # larger than the default init so that logits spread (a wrong decode shows)
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.25)
    return model


def _teacher_cfg():
    from megatron_attnedit.families import config_for_preset

    return config_for_preset("qwen3-debug")


def _qwen3(**over):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = dict(_teacher_cfg(), **over)
    for k in ("model_type", "architectures", "torch_dtype"):
        cfg.pop(k)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()


def _decode(model, prompt, steps):
    engine = DecodeEngine(model, batch=1, max_len=prompt.shape[1] + steps)
    return engine, engine.generate(prompt, steps)


def test_measured_kv_equals_formula_gqa_and_mla():
    teacher_cfg = _teacher_cfg()
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    # Qwen3 teacher: K and V of 2 KV heads x 16 per layer, fp32
    engine, res = _decode(_qwen3(), prompt, 7)
    kv = kv_measure.kv_summary(teacher_cfg, teacher_cfg, engine, res.positions, torch.float32)
    assert kv["attention"] == "gqa" and kv["positions"] == 16 and kv["measured_equals_config"]
    assert kv["measured_per_layer_bytes_per_token"] == kv["config_per_layer_bytes_per_token"] == [2 * 2 * 16 * 4] * 4
    assert kv["measured_bytes_per_token"] == kv["config_bytes_per_token"] == 4 * 2 * 2 * 16 * 4
    # MLA: the latent and the RoPE key
    mla = make_deepseek(3)
    engine, res = _decode(mla, prompt, 7)
    cfg = mla.config.to_dict()
    kv = kv_measure.kv_summary(cfg, teacher_cfg, engine, res.positions, torch.float32)
    assert kv["attention"] == "mla" and kv["measured_equals_config"]
    assert kv["measured_bytes_per_token"] == kv["config_bytes_per_token"] == 4 * (24 + 8) * 4
    assert kv_measure.config_bytes_per_token(cfg, teacher_cfg, 16, 2) == 4 * (24 + 8) * 2  # bf16: the targets' formula
    assert kv["per_context_bytes"]["4096"] == 4 * (24 + 8) * 4 * 4096


def test_measured_kv_sliding_layers():
    """Sliding layers of W = 16: the engine keeps min(W, positions) -- inside the window every
    position, beyond it W (transformers' own sliding cache keeps W - 1 between steps)."""
    teacher_cfg = _teacher_cfg()
    types = ["sliding_attention"] * 3 + ["full_attention"]
    model = _qwen3(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=types)
    cfg = model.config.to_dict()
    assert kv_measure.attention_of(cfg) == ("gate_swa", {"window": 16, "pattern": ["S", "S", "S", "F"]})
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    per_layer = 2 * 2 * 16 * 4
    engine, res = _decode(model, prompt, 9)  # 15 positions < W
    kv = kv_measure.kv_summary(cfg, teacher_cfg, engine, res.positions, torch.float32)
    assert kv["measured_equals_config"] and kv["measured_bytes_per_token"] == kv["config_bytes_per_token"] == 4 * per_layer
    engine, res = _decode(model, prompt, 34)  # 40 positions > W
    kv = kv_measure.kv_summary(cfg, teacher_cfg, engine, res.positions, torch.float32)
    assert kv["measured_equals_config"]
    assert kv["measured_per_layer_bytes_per_token"] == [per_layer * 16 / 40] * 3 + [per_layer]
    assert kv["config_bytes_per_token"] == per_layer * (3 * 16 / 40 + 1)
