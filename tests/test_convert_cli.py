"""The converter command lines: bad input (one `error:` line, exit 2, nothing left behind),
--overwrite / --allow-pickle, and streaming memory on a ~300 MB checkpoint."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from megatron_attnedit.convert.hf_io import HFCheckpoint

TOOLS = os.path.join(ROOT, "checkpoints_tools")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(d, **kw):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]


@pytest.fixture(scope="module")
def cases(tiny_hf, tmp_path_factory):
    """Builds the bad inputs, runs every case in one forked-CLI worker; returns (results, dirs)."""
    from megatron_attnedit.testing import make_tiny_hf

    w = tmp_path_factory.mktemp("cli")
    dense, moe = tiny_hf["dense"], tiny_hf["moe"]
    d = {}
    d["sharded"] = str(w / "sharded")
    make_tiny_hf(d["sharded"], "qwen3-debug", seed=2, max_shard_size="20KB")
    d["missing_shard"] = _copy(d["sharded"], w / "missing_shard")
    os.remove(os.path.join(d["missing_shard"], "model-00003-of-00026.safetensors"))
    d["truncated"] = _copy(dense, w / "truncated")
    st = os.path.join(d["truncated"], "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) * 6 // 10)
    d["gpt2"] = _copy(dense, w / "gpt2")
    _edit_config(d["gpt2"], model_type="gpt2")
    d["pickle"] = str(w / "pickle")
    os.makedirs(d["pickle"])
    shutil.copy(os.path.join(dense, "config.json"), d["pickle"])
    torch.save(load_file(os.path.join(dense, "model.safetensors")), os.path.join(d["pickle"], "pytorch_model.bin"))
    tensors = load_file(os.path.join(dense, "model.safetensors"))
    d["extra"] = _copy(dense, w / "extra")
    save_file(dict(tensors, **{"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}), os.path.join(d["extra"], "model.safetensors"), metadata={"format": "pt"})
    d["missing_tensor"] = _copy(dense, w / "missing_tensor")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.self_attn.k_proj.weight"}, os.path.join(d["missing_tensor"], "model.safetensors"), metadata={"format": "pt"})
    d["junk"] = str(w / "junk")
    os.makedirs(d["junk"])
    open(os.path.join(d["junk"], "notes.txt"), "w").write("not a checkpoint")

    out = lambda name: str(w / "out" / name)  # noqa: E731
    h2m = lambda name, src, *extra: dict(name=name, tool="hf_to_mcore", argv=["--hf-dir", src, "--save-dir", out(name), "--no-progress", *extra])  # noqa: E731
    plan = [
        h2m("missing-shard", d["missing_shard"]),
        h2m("truncated", d["truncated"]),
        h2m("model-type", d["gpt2"]),
        h2m("tp-not-dividing-kv-heads", dense, "--tensor-model-parallel-size", "4"),
        h2m("ep-not-dividing-experts", moe, "--expert-model-parallel-size", "3"),
        h2m("pp-not-dividing-layers", dense, "--pipeline-model-parallel-size", "3"),
        h2m("pickle", d["pickle"]),
        h2m("extra-hf-tensor", d["extra"]),
        h2m("missing-hf-tensor", d["missing_tensor"]),
        h2m("ep-on-dense", dense, "--expert-model-parallel-size", "2"),
        dict(name="save-dir-not-a-checkpoint", tool="hf_to_mcore", argv=["--hf-dir", dense, "--save-dir", d["junk"], "--overwrite", "--no-progress"]),
        dict(name="load-dir-not-a-checkpoint", tool="mcore_to_hf", argv=["--load-dir", dense, "--save-dir", out("load-dir-not-a-checkpoint"), "--no-progress"]),
        # an existing checkpoint: refused, then replaced with --overwrite
        h2m("first", dense),
        dict(name="exists", tool="hf_to_mcore", argv=["--hf-dir", moe, "--save-dir", out("first"), "--no-progress"]),
        dict(name="exists-overwrite", tool="hf_to_mcore", argv=["--hf-dir", moe, "--save-dir", out("first"), "--overwrite", "--no-progress"]),
        dict(name="hf-first", tool="mcore_to_hf", argv=["--load-dir", out("first"), "--save-dir", out("hf-first"), "--no-progress"]),
        dict(name="hf-exists", tool="mcore_to_hf", argv=["--load-dir", out("first"), "--save-dir", out("hf-first"), "--no-progress"]),
        dict(name="hf-exists-overwrite", tool="mcore_to_hf", argv=["--load-dir", out("first"), "--save-dir", out("hf-first"), "--overwrite", "--no-progress"]),
        dict(name="hf-bf16", tool="mcore_to_hf", argv=["--load-dir", out("first"), "--save-dir", out("hf-bf16"), "--dtype", "bfloat16", "--no-progress"]),
        h2m("pickle-allowed", d["pickle"], "--allow-pickle", "--ckpt-format", "torch"),
        dict(name="hf-pickle-allowed", tool="mcore_to_hf", argv=["--load-dir", out("pickle-allowed"), "--save-dir", out("hf-pickle-allowed"), "--no-progress"]),
    ]
    with open(w / "cases.json", "w") as f:
        json.dump(plan, f)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "convert_cli_cases.py"), str(w / "cases.json"), str(w / "result.json")],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.load(open(w / "result.json")), w, d


BAD = {
    # case: a piece of the message that tells the user what is wrong
    "missing-shard": "model-00003-of-00026.safetensors",
    "truncated": "truncated",
    "model-type": "unsupported model_type 'gpt2'",
    "tp-not-dividing-kv-heads": "num_key_value_heads",
    "ep-not-dividing-experts": "num_experts",
    "pp-not-dividing-layers": "num_hidden_layers",
    "pickle": "--allow-pickle",
    "extra-hf-tensor": "model.layers.0.mlp.extra_proj.weight",
    "missing-hf-tensor": "model.layers.2.self_attn.k_proj.weight",
    "ep-on-dense": "expert parallelism needs routed experts (e.g. qwen3_moe)",
    "save-dir-not-a-checkpoint": "does not look like a checkpoint",
    "load-dir-not-a-checkpoint": "latest_checkpointed_iteration.txt",
    "exists": "--overwrite",
    "hf-exists": "--overwrite",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_one_error_line_nothing_written(cases, name):
    result, w, d = cases
    r = result[name]
    lines = r["stderr"].splitlines()
    assert r["rc"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    assert BAD[name] in lines[0], lines[0]
    assert not os.path.exists(w / "out" / name), "a failed run left its output directory"
    assert _leftovers(w / "out") == [] and _leftovers(w) == []
    if name == "save-dir-not-a-checkpoint":
        assert os.listdir(d["junk"]) == ["notes.txt"]


def test_existing_checkpoint_refused_then_overwritten(cases, tiny_hf):
    result, w, _ = cases
    assert result["first"]["rc"] == 0 and result["hf-first"]["rc"] == 0
    assert result["exists-overwrite"]["rc"] == 0 and result["hf-exists-overwrite"]["rc"] == 0
    # the overwrite replaced the dense checkpoint with the MoE one, and its HF export follows
    cfg = json.load(open(w / "out" / "hf-first" / "config.json"))
    assert cfg["model_type"] == "qwen3_moe"
    back, src = HFCheckpoint(str(w / "out" / "hf-first")), HFCheckpoint(tiny_hf["moe"])
    assert set(back.keys()) == set(src.keys()) and all(torch.equal(back.get(k), src.get(k)) for k in src.keys())
    # each output lists what its tool wrote, and nothing else is there (what --overwrite relies on)
    for out, tool in (("first", "hf_to_mcore"), ("hf-first", "mcore_to_hf")):
        d = w / "out" / out
        tree = {str(p.relative_to(d)) for p in d.rglob("*")} - {".attnedit-manifest.json"}
        manifest = json.load(open(d / ".attnedit-manifest.json"))
        assert manifest["tool"] == tool and set(manifest["paths"]) == tree, manifest


def test_export_cast_to_bf16(cases, tiny_hf):
    result, w, _ = cases
    assert result["hf-bf16"]["rc"] == 0
    back, src = HFCheckpoint(str(w / "out" / "hf-bf16")), HFCheckpoint(tiny_hf["moe"])
    assert all(torch.equal(back.get(k), src.get(k).to(torch.bfloat16)) for k in src.keys())
    assert json.load(open(w / "out" / "hf-bf16" / "config.json"))["dtype"] == "bfloat16"


def test_pickle_weights_with_allow_pickle(cases, tiny_hf):
    result, w, _ = cases
    assert result["pickle-allowed"]["rc"] == 0 and result["hf-pickle-allowed"]["rc"] == 0
    back, src = HFCheckpoint(str(w / "out" / "hf-pickle-allowed")), HFCheckpoint(tiny_hf["dense"])
    assert set(back.keys()) == set(src.keys()) and all(torch.equal(back.get(k), src.get(k)) for k in src.keys())


def test_success_prints_closing_line(cases):
    result, _, _ = cases
    line = result["first"]["stdout"].strip().splitlines()[-1]
    assert re.match(r"hf_to_mcore: wrote [\d.]+ GB to .* in [\d.]+ s \([\d.]+ GB/s\); peak RSS", line), line


def test_thin_cli_script_error_line(tmp_path, tiny_hf):
    """The script itself (not only the library main): nothing on stderr but the error line."""
    bad = _copy(tiny_hf["dense"], tmp_path / "bad")
    _edit_config(bad, model_type="gpt2")
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "hf_to_mcore.py"), "--hf-dir", bad, "--save-dir", str(tmp_path / "out")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: unsupported model_type 'gpt2'; supported: qwen3, qwen3_moe, llama"]
    assert not (tmp_path / "out").exists()


# Measured on the 2-core CPU dev machine (idle-ish), 2026-11-22, with
#   python checkpoints_tools/hf_to_mcore.py --hf-dir HF --save-dir MC
#   python checkpoints_tools/mcore_to_hf.py --load-dir MC --save-dir BACK
# on the checkpoint below (fp32, 297 MB, largest tensor 98.3 MB: embed_tokens / lm_head 24000 x 1024):
#   hf_to_mcore: peak RSS 0.500 GB, 0.400 GB before streaming (imports + torch + megatron +
#                planning), so +0.100 GB = 1.0 x largest; 0.12-0.26 GB/s
#   mcore_to_hf: peak RSS 0.500 GB, 0.401 GB before streaming, +0.099 GB = 1.0 x largest
# The bound asserted is the issue's: before-streaming RSS + 2 x largest tensor.
STREAM_MODEL = dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=128, intermediate_size=3072,
                    num_hidden_layers=2, vocab_size=24000)  # 24000 is padded to 24064: the padding path is exercised


# The converter runs in a fresh child of a small intermediate process (a child exec'd from pytest
# itself would inherit pytest's peak RSS: Linux keeps the high-water mark across exec), under a
# runner that reads the converter's own peak RSS in its last atexit handler (registered first, so run
# last): the whole run -- imports, conversion, Python's exit handlers -- but not what shared
# libraries' destructors touch after that. That is no memory of the converter's: the CUDA build of
# torch (PyPI's torch on Python 3.12) pages in about 125 MB of its own code there (cuBLASLt 57 MB,
# cuSPARSELt 36 MB, libtorch_cuda 14 MB, ...: /proc/self/smaps before and after libc's exit(),
# 2026-12-07), which the intermediate's getrusage(RUSAGE_CHILDREN) would count.
RUNNER = ("import atexit, json, resource, runpy, sys; out = sys.argv.pop(1); "
          "atexit.register(lambda: json.dump({'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, open(out, 'w'))); "
          "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
INTERMEDIATE = ("import json, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-3000:]}))")


def _run_measured(args, tmp_path):
    """Run a converter script in a fresh child; return (its closing line, its peak RSS as RUNNER
    reads it)."""
    measured = tmp_path / "maxrss.json"
    proc = subprocess.run([sys.executable, "-c", INTERMEDIATE, sys.executable, "-c", RUNNER, str(measured), *args], env=ENV,
                          capture_output=True, text=True, timeout=600)
    r = json.loads(proc.stdout)
    assert r["rc"] == 0, r["err"]
    return r["out"].strip().splitlines()[-1], json.load(open(measured))["maxrss"]


def test_streaming_peak_rss(tmp_path):
    from megatron_attnedit.testing import make_tiny_hf

    hf = str(tmp_path / "hf")
    make_tiny_hf(hf, "qwen3-debug", seed=0, max_shard_size="150MB", **STREAM_MODEL)
    src = HFCheckpoint(hf)
    largest = max(torch.Size(src.info(k)[1]).numel() * src.info(k)[0].itemsize for k in src.keys())
    assert src.nbytes() > 250e6
    report = {}
    for tool, args in (
        ("hf_to_mcore", ["--hf-dir", hf, "--save-dir", str(tmp_path / "mc")]),
        ("mcore_to_hf", ["--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "back")]),
    ):
        line, peak = _run_measured([os.path.join(TOOLS, tool + ".py"), *args, "--no-progress"], tmp_path)
        m = re.search(r"\(([\d.]+) GB/s\); peak RSS ([\d.]+) GB \(([\d.]+) GB before streaming", line)
        gbps, reported_peak, before = float(m.group(1)), float(m.group(2)) * 1e9, float(m.group(3)) * 1e9
        report[tool] = f"peak {peak / 1e9:.3f} GB, before streaming {before / 1e9:.3f} GB, largest {largest / 1e9:.3f} GB, {gbps} GB/s"
        assert abs(reported_peak - peak) < 0.02e9, (line, peak)  # the closing line tells the truth
        assert peak <= before + 2 * largest, f"{tool}: {report[tool]}"
    print(report)
    back = HFCheckpoint(str(tmp_path / "back"))
    assert set(back.keys()) == set(src.keys())
    for k in src.keys():
        assert torch.equal(back.get(k), src.get(k)), k
