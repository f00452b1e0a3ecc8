"""HF <-> megatron conversion: bit-exact round trips through megatron itself at TP/PP/EP in {1, 2}
in both checkpoint formats, key coverage both ways, and the torch_dist layout against what
megatron's own save writes. All megatron work runs in one torchrun (tests/workers/convert_roundtrip.py).

Bad input and streaming memory are in test_convert_cli.py.
"""

import json
import os

import pytest
import torch

from conftest import torchrun
from megatron_attnedit.convert.hf_io import HFCheckpoint
from megatron_attnedit.convert.checkpoint import COMMON_STATE_KEY

# megatron layouts each model goes through: (name, kind, tp, pp, ep); dense has no experts, so no EP
LAYOUTS = [
    ("dense-tp2", "dense", 2, 1, 1),
    ("dense-pp2", "dense", 1, 2, 1),
    ("moe-tp2", "moe", 2, 1, 1),
    ("moe-pp2", "moe", 1, 2, 1),
    ("moe-ep2", "moe", 1, 1, 2),
    ("tied-pp2", "tied", 1, 2, 1),  # tied embeddings: the last stage holds a copy of the embedding
    ("llama-tp2", "llama", 2, 1, 1),  # Llama 3: no q/k-norm, llama3 RoPE scaling, tied embeddings
    ("llama-pp2", "llama", 1, 2, 1),
    ("llama-untied-tp2", "llama_untied", 2, 1, 1),
]
# legacy files carry their layout; TP/PP/EP = 1 as well
LEGACY = LAYOUTS + [("dense-tp1", "dense", 1, 1, 1), ("moe-tp1", "moe", 1, 1, 1), ("llama-tp1", "llama", 1, 1, 1)]
# torch_dist written by the converter (layout-free), converted straight back
DIRECT = ["dense", "moe", "tied", "sharded", "llama", "llama_untied"]
COVERAGE = ["dense", "moe", "tied", "llama", "llama_untied"]


@pytest.fixture(scope="module")
def hf(tiny_hf, tmp_path_factory):
    from megatron_attnedit.testing import make_tiny_hf

    base = tmp_path_factory.mktemp("hf_more")
    out = dict(tiny_hf)
    out["tied"] = str(base / "tied")
    make_tiny_hf(out["tied"], "qwen3-debug", seed=3, tie_word_embeddings=True, vocab_size=250)  # padded to 256
    out["sharded"] = str(base / "sharded")  # several safetensors files + index
    make_tiny_hf(out["sharded"], "qwen3-debug", seed=2, max_shard_size="20KB")
    return out


@pytest.fixture(scope="module")
def run(hf, tmp_path_factory):
    """Runs the whole plan once; returns (result dict, dirs)."""
    w = tmp_path_factory.mktemp("convert")
    d = lambda *p: str(w.joinpath(*p))  # noqa: E731
    plan = {"to_mcore": [], "megatron": [], "to_hf": [], "coverage": []}
    for kind in DIRECT:
        plan["to_mcore"].append(dict(hf_dir=hf[kind], save_dir=d("dist", kind), tp=1, pp=1, ep=1, format="torch_dist"))
        plan["to_hf"].append(dict(load_dir=d("dist", kind), save_dir=d("back", "dist-" + kind), max_shard_size="100KB"))
    for name, kind, tp, pp, ep in LAYOUTS:
        plan["megatron"].append(dict(name="dist-" + name, hf_dir=hf[kind], ckpt=d("dist", kind), tp=tp, pp=pp, ep=ep, out=d("resaved", name)))
        plan["to_hf"].append(dict(load_dir=d("resaved", name), save_dir=d("back", "resaved-" + name)))
    for name, kind, tp, pp, ep in LEGACY:
        plan["to_mcore"].append(dict(hf_dir=hf[kind], save_dir=d("legacy", name), tp=tp, pp=pp, ep=ep, format="torch"))
        plan["to_hf"].append(dict(load_dir=d("legacy", name), save_dir=d("back", "legacy-" + name)))
        if name in dict((n, 1) for n, *_ in LAYOUTS):
            plan["megatron"].append(dict(name="legacy-" + name, hf_dir=hf[kind], ckpt=d("legacy", name), tp=tp, pp=pp, ep=ep))
    for kind in COVERAGE:
        plan["coverage"].append(dict(name=kind, hf_dir=hf[kind]))
    with open(d("plan.json"), "w") as f:
        json.dump(plan, f)
    torchrun("convert_roundtrip.py", "--plan", d("plan.json"), "--result", d("result.json"), timeout=900)
    with open(d("result.json")) as f:
        return json.load(f), w


def _assert_same_hf(src_dir, back_dir):
    src, back = HFCheckpoint(src_dir), HFCheckpoint(back_dir)
    assert set(back.keys()) == set(src.keys()), set(back.keys()) ^ set(src.keys())
    for k in src.keys():
        a, b = src.get(k), back.get(k)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{k} differs after the round trip"


@pytest.mark.parametrize("kind", DIRECT)
def test_round_trip_torch_dist_direct(run, hf, kind):
    _, w = run
    _assert_same_hf(hf[kind], w / "back" / f"dist-{kind}")


@pytest.mark.parametrize("name,kind,tp,pp,ep", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_round_trip_torch_dist_through_megatron(run, hf, name, kind, tp, pp, ep):
    """HF -> torch_dist -> megatron model at TP/PP/EP (dist_checkpointing.load) -> megatron's own
    dist_checkpointing.save -> HF: every tensor bit-exact."""
    result, w = run
    assert result["megatron"]["dist-" + name]["mismatched"] == []
    assert result["megatron"]["dist-" + name]["tensors"] > 0
    _assert_same_hf(hf[kind], w / "back" / f"resaved-{name}")


@pytest.mark.parametrize("name,kind,tp,pp,ep", LEGACY, ids=[x[0] for x in LEGACY])
def test_round_trip_legacy(run, hf, name, kind, tp, pp, ep):
    """HF -> per-rank files at TP/PP/EP -> HF bit-exact; at >1 the files also load strictly into
    megatron models at that layout with the same values as loading HF directly."""
    result, w = run
    if "legacy-" + name in result["megatron"]:
        assert result["megatron"]["legacy-" + name]["mismatched"] == []
        assert result["megatron"]["legacy-" + name]["tensors"] > 0
    _assert_same_hf(hf[kind], w / "back" / f"legacy-{name}")


def test_legacy_rank_files_named_as_megatron_lm(run):
    _, w = run
    ranks = lambda n: sorted(os.listdir(w / "legacy" / n / "iter_0000000"))  # noqa: E731
    assert ranks("dense-tp2") == ["hf_assets", "mp_rank_00", "mp_rank_01"]
    assert ranks("dense-pp2") == ["hf_assets", "mp_rank_00_000", "mp_rank_00_001"]
    assert ranks("moe-ep2") == ["hf_assets", "mp_rank_00_000", "mp_rank_00_001"]  # EP suffix when PP == 1
    state = torch.load(w / "legacy" / "moe-ep2" / "iter_0000000" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
    assert (state["args"].expert_model_parallel_size, state["args"].num_experts) == (2, 4)
    # rank 1 of EP holds experts 2, 3 of the 4 under local indices 0, 1
    assert "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight" in state["model"]
    assert "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight" not in state["model"]
    assert (w / "legacy" / "moe-ep2" / "latest_checkpointed_iteration.txt").read_text() == "0"


@pytest.mark.parametrize("kind", COVERAGE)
def test_key_coverage_both_ways(run, kind):
    """Every megatron parameter of a built model has a rule and every rule a parameter; every HF
    tensor is consumed and every consumed name exists; the check fails when a rule is missing."""
    cov = run[0]["coverage"][kind]
    assert cov.pop("params_without_rule") == []
    assert cov.pop("rules_without_param") == []
    assert cov.pop("hf_not_consumed") == []
    assert cov.pop("consumed_not_in_hf") == []
    assert cov.pop("meta_layout_equals_model") is True
    (bites,) = cov.values()
    assert bites is True


@pytest.mark.parametrize("kind,layout", [("dense", "dense-tp2"), ("moe", "moe-ep2"), ("llama", "llama-tp2")])
def test_torch_dist_layout_equals_megatron_save(run, kind, layout):
    """The converter's files hold exactly the keys, global shapes and dtypes megatron's own
    dist_checkpointing.save writes for the same model (there at TP=2 / EP=2)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _, w = run

    def md(path):
        m = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {k: (tuple(v.size), v.properties.dtype) if isinstance(v, TensorStorageMetadata) else "bytes" for k, v in m.items()}

    ours = md(w / "dist" / kind / "iter_0000000")
    megatron = md(w / "resaved" / layout / "iter_0000000")
    # megatron-core >= 0.17's save keeps the non-tensor state there instead of in common.pt; the
    # converter writes common.pt, which every supported megatron-core loads
    megatron.pop(COMMON_STATE_KEY, None)
    assert ours == megatron
    for f in ("metadata.json", "common.pt", ".metadata"):
        assert (w / "dist" / kind / "iter_0000000" / f).is_file()


def test_hf_output_loads_with_transformers(run, hf):
    """The exported directory is a working HF model: same logits as the source, config and
    generation config carried through, weights split into several shards by --max-shard-size."""
    from megatron_attnedit.testing import hf_logits

    _, w = run
    back = w / "back" / "dist-moe"
    shards = sorted(p.name for p in back.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((back / "config.json").read_text()) == json.loads(open(os.path.join(hf["moe"], "config.json")).read())
    assert (back / "generation_config.json").is_file()
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(str(back), tokens), hf_logits(hf["moe"], tokens))
