"""GPU check of the converters at a real model shape; prints one JSON object.

    python launch/check_conversion.py --preset qwen3-8b --work /tmp/conv [--layers N]

1. writes a random-weight HF checkpoint of the preset (bf16, sharded safetensors) with transformers;
2. converts it HF -> megatron (torch_dist, TP=1) and back with the project's CLIs, recording
   wall time, GB/s and the peak RSS of each converter process;
3. checks the round trip is bit-exact for every tensor;
4. loads the megatron checkpoint into a megatron-core model on the GPU (bf16) and compares its
   logits with transformers' on the same tokens (cosine similarity, max abs difference).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_measured(cmd):
    """Run a command; return (seconds, peak RSS in bytes over the process tree)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    proc = psutil.Process(p.pid)
    peak = [0]

    def poll():
        while p.poll() is None:
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = p.wait()
    th.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {rc}")
    return time.time() - t0, peak[0]


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--work", default="/tmp/attnedit_conv")
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_attnedit.models import builder
    from megatron_attnedit import families

    shutil.rmtree(a.work, ignore_errors=True)
    hf_dir, mc_dir, back_dir = (os.path.join(a.work, x) for x in ("hf", "mcore", "hf_back"))
    cfg = families.config_for_preset(a.preset)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    mt = cfg.pop("model_type")
    cfg.pop("architectures")
    cfg.pop("torch_dtype")
    result = {"device": torch.cuda.get_device_name(), "preset": a.preset, "layers": cfg["num_hidden_layers"]}

    t0 = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg), dtype=torch.bfloat16)
    model.save_pretrained(hf_dir, max_shard_size="5GB")
    tokens = torch.randint(0, cfg["vocab_size"], (1, a.seq), device="cuda")
    with torch.no_grad():
        ref = model(tokens).logits.float()
    result["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    del model
    torch.cuda.empty_cache()
    result["make_hf_s"] = round(time.time() - t0, 1)

    gb = dir_bytes(hf_dir) / 1e9
    s, rss = run_measured([sys.executable, "checkpoints_tools/hf_to_mcore.py", "--hf-dir", hf_dir, "--save-dir", mc_dir])
    result["hf_to_mcore"] = {"GB": round(gb, 2), "s": round(s, 1), "GB_per_s": round(gb / s, 3), "peak_rss_GB": round(rss / 1e9, 2)}
    s, rss = run_measured([sys.executable, "checkpoints_tools/mcore_to_hf.py", "--load-dir", mc_dir, "--save-dir", back_dir])
    result["mcore_to_hf"] = {"GB": round(gb, 2), "s": round(s, 1), "GB_per_s": round(gb / s, 3), "peak_rss_GB": round(rss / 1e9, 2)}

    from megatron_attnedit.convert.hf_io import HFCheckpoint

    src, dst = HFCheckpoint(hf_dir), HFCheckpoint(back_dir)
    mismatched = [k for k in src.keys() if not torch.equal(src.get(k), dst.get(k))]
    result["round_trip_bit_exact"] = not mismatched and set(src.keys()) == set(dst.keys())

    from megatron_attnedit import platform

    plat = platform.init_platform("cuda")
    platform.init_distributed(plat)
    from megatron.core import dist_checkpointing, tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    from megatron_attnedit.models import forward

    hf_cfg = families.load_hf_config(hf_dir)
    opts = builder.BuildOptions(params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=False, perform_initialization=False)
    mmodel = builder.build_model(hf_cfg, opts)
    iters = open(os.path.join(mc_dir, "latest_checkpointed_iteration.txt")).read().strip()
    it_dir = os.path.join(mc_dir, "release" if iters == "release" else f"iter_{int(iters):07d}")
    dist_checkpointing.load(mmodel.sharded_state_dict(), it_dir)
    got = forward.forward_logits(mmodel, tokens, hf_cfg["vocab_size"]).float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(0, 1), ref.flatten(0, 1), dim=-1)
    result["logits_bf16"] = {
        "cosine_mean": round(cos.mean().item(), 6),
        "cosine_min": round(cos.min().item(), 6),
        "max_abs_diff": round((got - ref).abs().max().item(), 4),
        "argmax_agree": round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
