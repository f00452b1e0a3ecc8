"""Grouped-GEMM experts (models/experts.py) against megatron's SequentialMLP and transformers.

One process: the module against SequentialMLP on the same weights (output, input/probability and
weight gradients; an expert with no token; a layer with no token), both compute paths; the
qwen3-moe-debug model at TP1 against transformers' logits; the same initial weights as
SequentialMLP from the same seed; the optimizer's checkpoint entries; colocation sharing.
Two gloo processes (tests/workers/experts_parallel.py): logits at EP2, at TP2 (expert TP) and at DP2,
checkpoint entries equal to SequentialMLP's, torch_dist checkpoints loading across implementations
and layouts.
"""

import json

import pytest
import torch

from conftest import torchrun
from megatron_attnedit import platform
from megatron_attnedit.models import builder
from megatron_attnedit.models.layers import gpt_layout_name, local_layers
from megatron_attnedit import families
from megatron_attnedit.testing import hf_logits

TOL = 1e-5  # module level, fp32
LOGITS_TOL = 1e-4  # the parity tests' bound


@pytest.fixture(scope="module")
def env():
    plat = platform.init_platform("cpu")
    platform.init_distributed(plat)


def seeded(seed=1234):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def experts_pair(num_experts=4):
    """SequentialMLP and GroupedExperts of the qwen3-moe-debug MoE shape, from the same seed."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_attnedit import compat

    cfg = families.config_for_preset("qwen3-moe-debug")
    cfg["num_experts"] = num_experts
    mods = []
    for grouped in (False, True):
        opts = builder.BuildOptions(grouped_gemm=grouped)
        config = builder.transformer_config(cfg, opts)
        seeded()
        spec = compat.mlp_submodules(builder.mlp_spec(opts, moe=True)).experts  # a ModuleSpec or (0.17+) a partial
        mods.append(spec(num_experts, config, pg_collection=get_default_pg_collection()))
    return mods


def run(mod, x, counts, probs, grad):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = mod(x, torch.tensor(counts), probs)
    assert bias is None
    out.backward(grad)
    return out, x.grad, probs.grad


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("counts", [[5, 0, 7, 3], [0, 0, 0, 0]], ids=["one-expert-empty", "no-tokens"])
def test_module_equals_sequential_mlp(env, impl, counts):
    seq, grp = experts_pair()
    grp.impl = impl
    for i, e in enumerate(seq.local_experts):  # the same initial weights from the same seed
        assert torch.equal(e.linear_fc1.weight, grp.fc1_weight[i]) and torch.equal(e.linear_fc2.weight, grp.fc2_weight[i])
    g = torch.Generator().manual_seed(0)
    n = sum(counts)
    x, probs, grad = torch.randn(n, 64, generator=g), torch.rand(n, generator=g), torch.randn(n, 64, generator=g)
    ref, got = run(seq, x, counts, probs, grad), run(grp, x, counts, probs, grad)
    assert grp.uses_grouped_mm(x) == (impl == "grouped_mm")
    assert got[0].shape == (n, 64)
    for name, r, o in zip(("output", "input grad", "probs grad"), ref, got):
        assert r.shape == o.shape, name
        assert n == 0 or (r - o).abs().max().item() <= TOL, name
    for i, e in enumerate(seq.local_experts):
        for sub, stacked in (("linear_fc1", grp.fc1_weight), ("linear_fc2", grp.fc2_weight)):
            r = getattr(e, sub).weight.grad
            assert stacked.grad is not None and r is not None, "every expert weight gets a gradient"
            assert (r - stacked.grad[i]).abs().max().item() <= TOL, f"{sub} weight grad of expert {i}"
            if counts[i] == 0:
                assert not stacked.grad[i].any(), f"expert {i} had no token: zero gradient"


def test_parameters_as_sequential_mlp(env):
    """What DDP / the optimizer / the converters read off the module."""
    seq, grp = experts_pair()
    w = seq.local_experts[0].linear_fc1.weight
    for p, dim in ((grp.fc1_weight, 1), (grp.fc2_weight, 2)):
        assert p.allreduce == w.allreduce and p.tensor_model_parallel and p.partition_dim == dim
    assert grp.fc1_weight.partition_stride == w.partition_stride == 2
    # the module state dict under SequentialMLP's names, views of the stacked parameters
    s_sd, g_sd = seq.state_dict(keep_vars=True), grp.state_dict(keep_vars=True)
    assert list(s_sd) == list(g_sd)
    v = g_sd["local_experts.2.linear_fc2.weight"]
    assert v.untyped_storage().data_ptr() == grp.fc2_weight.untyped_storage().data_ptr()
    # and loads from them (and from its own stacked names)
    seeded(7)
    other = experts_pair()[1]
    with torch.no_grad():
        other.fc1_weight.mul_(2)
    other.load_state_dict(seq.state_dict(), strict=True)
    assert torch.equal(other.fc1_weight, grp.fc1_weight)
    sd = {"fc1_weight": grp.fc1_weight.detach() * 3, "fc2_weight": grp.fc2_weight.detach()}
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other.fc1_weight, grp.fc1_weight * 3)


def test_optimizer_checkpoint_entries_as_sequential_mlp(env):
    """megatron's non-distributed optimizer maps its state through the model's entries: the grouped
    module's factories must give the same per-expert optimizer tensors."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, optim_state_to_sharding_state

    def optimizer_entries(mod):
        x = torch.randn(15, 64, generator=torch.Generator().manual_seed(1))
        out, _ = mod(x, torch.tensor([5, 0, 7, 3]), torch.ones(15))
        out.square().sum().backward()
        params = list(mod.parameters())
        opt = torch.optim.Adam(params)
        opt.step()
        state = opt.state_dict()
        optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(mod.sharded_state_dict(prefix="experts."), params), ("step",))
        apply_factories(state)
        return sorted((t.key, tuple(t.global_offset), tuple(t.local_shape), t.data.sum().item()) for t in nested_values(state["state"]))

    seq, grp = experts_pair()
    ref, got = optimizer_entries(seq), optimizer_entries(grp)
    assert len(ref) == 4 * 3 * 2 and [r[:3] for r in ref] == [g[:3] for g in got]  # (w, v) fc1 + fc2, 4 experts, 2 states
    assert all(abs(r[3] - g[3]) <= 1e-3 * max(1.0, abs(r[3])) for r, g in zip(ref, got))


def test_model_matches_transformers_tp1(env, tiny_hf):
    from megatron_attnedit.convert import hf_io
    from megatron_attnedit.families.table import ModelTable
    from megatron_attnedit.distill.colocate import freeze, share_frozen_modules
    from megatron_attnedit.models import forward

    cfg = families.load_hf_config(tiny_hf["moe"])
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(tiny_hf["moe"], tokens)

    def loaded(grouped):
        seeded()
        m = builder.build_model(cfg, builder.BuildOptions(grouped_gemm=grouped))
        hf_io.load_into_model(m, hf_io.HFCheckpoint(tiny_hf["moe"]), ModelTable(cfg))
        return m

    model = loaded(True)
    moe = [layer.mlp.experts for layer in local_layers(model) if hasattr(layer.mlp, "experts")]
    assert moe and all(type(e).__name__ == "GroupedExperts" for e in moe)
    for impl in ("loop", "grouped_mm"):
        for e in moe:
            e.impl = impl
        diff = (forward.forward_logits(model, tokens, cfg["vocab_size"]) - ref).abs().max().item()
        assert diff <= LOGITS_TOL, f"max |grouped ({impl}) - HF| = {diff:.3e}"
    # colocation shares a frozen MoE block by state-dict equality: works on the per-expert views
    student = freeze(loaded(True))
    shared = [gpt_layout_name(student)(p) for p in share_frozen_modules(freeze(loaded(True)), student)]
    assert "decoder.layers.1.mlp" in shared


def test_parallel_layouts_and_checkpoints(tiny_hf, tmp_path):
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    ref = hf_logits(tiny_hf["moe"], tokens)
    torchrun("experts_parallel.py", "--hf-dir", tiny_hf["moe"], "--tokens", tmp_path / "tokens.pt", "--work", tmp_path,
             "--result", tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result) == {"tp1_ep2", "tp2_ep1", "tp1_ep1"}
    for name, r in result.items():
        for impl in ("loop", "grouped_mm"):
            diff = (torch.load(tmp_path / f"logits_{name}_{impl}.pt") - ref).abs().max().item()
            assert diff <= LOGITS_TOL, f"{name} {impl}: max |grouped - HF| = {diff:.3e}"
        assert r["state_vs_sequential"] == [], name
        assert r["sharded_entries"] == [], name
        # per rank: 3 MoE layers x local experts x (fc1 gate, fc1 up, fc2, 2 _extra_state objects)
        assert r["expert_entries"] == [3 * (2 if name == "tp1_ep2" else 4) * 5] * 2, name
        assert [x == [0, 0] for x in r["replica_ids"]] == ([True, False] if name == "tp1_ep1" else [True, True]), name
        assert all(r["fresh_differs_before_load"]), name
        assert r["grouped_from_sequential_ckpt"] == [] and r["sequential_from_grouped_ckpt"] == [], name
    assert result["tp2_ep1"]["grouped_from_other_layout_ckpt"] == []
