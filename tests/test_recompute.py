"""Activation recomputation (``model.recompute_*``: megatron's full and selective recompute) with the
local spec and this project's modules, on one process: in a training step the recomputed part runs
twice (forward, then again during backward), the rest once, and logits and every gradient equal
those of the same model without recomputation."""

import pytest
import torch

from megatron_attnedit import platform
from megatron_attnedit.config import TargetConfig
from megatron_attnedit.models.layers import local_layers
from megatron_attnedit.models import builder
from megatron_attnedit import families


@pytest.fixture(scope="module")
def env():
    platform.init_distributed(platform.init_platform("cpu"))


CASES = {
    # id: (preset, MLA student?, recompute options, {submodule path in a layer: layers where it runs twice})
    "full_uniform": ("qwen3-debug", False, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                     {"": [0, 1, 2, 3]}),
    "full_block2": ("qwen3-debug", False, dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
                    {"": [0, 1]}),
    "core_attn": ("qwen3-debug", False, dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
                  {"self_attention.core_attention": [0, 1, 2, 3], "mlp": []}),
    "layernorm_mlp": ("qwen3-debug", False, dict(recompute_granularity="selective", recompute_modules=["layernorm", "mlp"]),
                      {"input_layernorm": [0, 1, 2, 3], "pre_mlp_layernorm": [0, 1, 2, 3], "mlp": [0, 1, 2, 3],
                       "self_attention.core_attention": []}),
    # Distillation's case: the embedding and the norms frozen, so layer 0's input norm needs no
    # gradient; it is then not checkpointed (megatron's would fail in the backward) and runs once.
    "layernorm_frozen_input": ("qwen3-debug", False, dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
                               {"input_layernorm": [1, 2, 3], "pre_mlp_layernorm": [0, 1, 2, 3]}),
    # Full recompute with a frozen embedding: megatron's reentrant checkpoint gives no weight any
    # gradient unless the decoder input asks for one (builder._decoder_input_needs_grad).
    "full_frozen_input": ("qwen3-debug", False, dict(recompute_granularity="full"), {"": [0, 1, 2, 3]}),
    "moe": ("qwen3-moe-debug", False, dict(recompute_granularity="selective", recompute_modules=["moe"]),
            {"mlp.router": [1, 2, 3], "mlp.experts": [1, 2, 3], "self_attention": []}),  # layer 0 is dense (mlp_only_layers)
    "mla_up_proj": ("qwen3-debug", True, dict(recompute_granularity="selective", recompute_modules=["mla_up_proj", "core_attn"]),
                    {"self_attention.linear_kv_up_proj": [0, 1, 2, 3], "self_attention.core_attention": [0, 1, 2, 3],
                     "self_attention.linear_kv_down_proj": []}),
}


def _build(preset, mla, **recompute):
    from megatron.core import tensor_parallel

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = families.config_for_preset(preset)
    opts = builder.BuildOptions(**recompute)
    if mla:
        from megatron_attnedit.targets.student import build_student

        return build_student(cfg, TargetConfig("mla", {"kv_lora_rank": 32}), opts)
    return builder.build_model(cfg, opts)


def _step(model, watched):
    """Logits, gradients and {(path, layer): forward calls} of one forward + backward."""
    calls, handles = {}, []
    for i, layer in enumerate(local_layers(model)):
        for path in watched:
            try:
                module = layer.get_submodule(path) if path else layer
            except AttributeError:  # e.g. the router of a dense layer in the MoE model
                continue

            def count(*_, key=(path, i)):
                calls[key] = calls.get(key, 0) + 1

            handles.append(module.register_forward_hook(count))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, 24), generator=g)
    positions = torch.arange(24).unsqueeze(0).expand(2, -1)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, None)
    (logits.float() * torch.randn(logits.shape, generator=g)).sum().backward()
    for h in handles:
        h.remove()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_recompute_runs_twice_and_changes_nothing(env, case):
    preset, mla, options, twice = CASES[case]
    ref = _build(preset, mla)
    got = _build(preset, mla, **options)
    got.load_state_dict(ref.state_dict())
    if case.endswith("frozen_input"):
        for model in (ref, got):
            for n, p in model.named_parameters():
                p.requires_grad_(not (n.startswith("embedding.") or "layernorm" in n))
    logits_ref, grads_ref, calls_ref = _step(ref, twice)
    logits, grads, calls = _step(got, twice)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for n in grads:  # fp32 rounding: recomputed layer norms reorder gradient sums (~2e-7 of the largest entry)
        scale = float(grads_ref[n].abs().max())
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=0, atol=2e-6 * scale, msg=lambda m, n=n: f"{n}: {m}")
    assert calls.keys() == calls_ref.keys() and {p for p, _ in calls} == set(twice)
    for (path, layer), n in calls_ref.items():
        assert n == 1, (path, layer, n)
        assert calls[(path, layer)] == (2 if layer in twice[path] else 1), (case, path or "layer", layer, calls[(path, layer)])
