"""The teacher and its MLA student in llama.cpp on the CPU: the KV cache llama.cpp allocates, next to
the project's formula, and decode speed. One JSON line per model and context on stdout.

    python launch/bench_llama_cpp.py                                   # 4K, 32K, 128K tokens; decode at 4K and 32K
    python launch/bench_llama_cpp.py --student runs/quickstart/hf/mla --contexts 4096,32768 --decode-contexts 4096

Models: the bundled teacher (qwen3-tiny-stdlib) and ``--student`` (an MLA export; by default a
random-weight DeepSeek-V2 of the quickstart MLA student's shape -- kv_lora_rank 96 + RoPE 32,
6 layers, hidden 256 -- with the teacher's tokenizer: KV bytes and speed depend on the shape only).
Both are written to GGUF by the project's hf_to_gguf in their declared dtype (bfloat16), from a
copy of their config whose max_position_embeddings is the largest context (the bundled teacher was
trained at 2,048 tokens; past that its outputs mean nothing, which timing does not care about).

Per context C: the model is loaded with an f16 KV cache of C cells (llama.cpp's default cache
type) and ``kv_bytes`` is what llama.cpp reports allocating for it (its "llama_kv_cache: size"
log line, K and V separately), next to ``formula_bytes`` = C x the target's KV formula (targets/<name>) at 2
bytes per value. At the decode contexts, C - 64 random tokens are prefilled (``prefill_s``), then
``--decode-tokens`` tokens are decoded one at a time through the cache (``decode_tok_s``, the
median step); the rest of the context stays free. Threads: prefill on every core, decode on
``--threads`` (default 1: a decode step of a model this small takes milliseconds, and on a
machine whose cores are shared a second decode thread mostly measures the other processes).
Flash attention: on by default, as llama.cpp's own programs run (llama-cli / llama-server: auto, on
for the CPU); llama-cpp-python's Llama leaves it off unless asked (``--flash-attn off``). Without
it, llama.cpp's MLA path copies the transposed latent (its V) out of the cache at every step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "megatron_attnedit", "assets", "teachers", "qwen3-tiny-stdlib")
QUICKSTART_MLA = dict(kv_lora_rank=96, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, q_lora_rank=None)
_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers.*K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")


def long_copy(src: str, dst: str, context: int) -> str:
    """``src`` with max_position_embeddings = context (weights linked, not copied)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f != "config.json" and not f.startswith("."):
            os.symlink(os.path.join(os.path.abspath(src), f), os.path.join(dst, f))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings", 0)), context)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def random_mla_student(dst: str) -> str:
    """A random-weight DeepSeek-V2 of the quickstart MLA student's shape, the teacher's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    with open(os.path.join(TEACHER, "config.json")) as f:
        t = json.load(f)
    cfg = DeepseekV2Config(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_attention_heads"], first_k_dense_replace=t["num_hidden_layers"],
        n_routed_experts=0, n_shared_experts=0, max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=t["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": 100.0}, bos_token_id=t["bos_token_id"], eos_token_id=t["eos_token_id"],
        pad_token_id=t["pad_token_id"], **QUICKSTART_MLA)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(TEACHER, f), os.path.join(dst, f))
    return dst


def formula_per_token(cfg: dict) -> int:
    """The target's KV formula (targets/<name>) at 2 bytes per value, summed over layers."""
    from megatron_attnedit.inference import kv

    return int(sum(kv.formula_per_layer(cfg, 1, 2)))


def load(gguf_path: str, context: int, threads: int, flash_attn: bool = True):
    """The model with a cache of ``context`` cells, and llama.cpp's own log of what it allocated."""
    import llama_cpp

    log = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)  # llama.cpp logs through C stdio, not Python's sys.stderr
    try:
        model = llama_cpp.Llama(model_path=gguf_path, n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=os.cpu_count() or 1,
                                flash_attn=flash_attn, verbose=True)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    log.seek(0)
    text = log.read().decode(errors="replace")
    m = _KV_LINE.search(text)
    if m is None:
        raise RuntimeError(f"no KV cache line in llama.cpp's log for {gguf_path}:\n{text[-2000:]}")
    mib = lambda i: float(m.group(i)) * 2**20  # noqa: E731
    kv = {"kv_bytes": mib(1), "kv_cells": int(m.group(2)), "kv_layers": int(m.group(3)),
          "k_bytes": mib(5), "k_type": m.group(4), "v_bytes": mib(7), "v_type": m.group(6)}
    return model, kv


def decode_speed(model, context: int, steps: int, vocab: int) -> dict:
    import random

    rng = random.Random(0)
    prompt = [rng.randrange(4, vocab) for _ in range(context - 64)]
    t0 = time.perf_counter()
    model.eval(prompt)
    prefill = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.eval([rng.randrange(4, vocab)])
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    return {"prefilled": len(prompt), "prefill_s": round(prefill, 2), "decode_steps": steps, "decode_step_ms": round(step * 1e3, 3),
            "decode_tok_s": round(1.0 / step, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=None, help="an MLA export (HF directory); default: a random-weight one of the quickstart shape")
    ap.add_argument("--contexts", default="4096,32768,131072", help="cache sizes (tokens) whose allocation is reported")
    ap.add_argument("--decode-contexts", default="4096,32768", help="contexts at which decode speed is measured (prefill cost grows as C^2)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="decode threads (prefill uses every core)")
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on")
    ap.add_argument("--work", default=None, help="where the GGUFs go (default: a temporary directory)")
    a = ap.parse_args(argv)
    contexts = [int(c) for c in a.contexts.split(",")]
    decode_at = {int(c) for c in a.decode_contexts.split(",") if c}
    work = a.work or tempfile.mkdtemp(prefix="bench_llama_cpp.")
    from megatron_attnedit.convert.gguf_export import hf_to_gguf

    student = a.student or random_mla_student(os.path.join(work, "mla-random"))
    models = {"teacher": TEACHER, "mla": student}
    for name, hf in models.items():
        src = long_copy(hf, os.path.join(work, f"{name}-hf"), max(contexts))
        g = os.path.join(work, f"{name}.gguf")
        hf_to_gguf(src, g, overwrite=True, progress=False)
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        per_token = formula_per_token(cfg)
        for c in contexts:
            model, kv = load(g, c, a.threads, a.flash_attn == "on")
            row = {"model": name, "hf_dir": hf, "arch": cfg["model_type"], "context": c, **kv,
                   "formula_bytes": per_token * kv["kv_cells"], "formula_per_token": per_token,
                   "kv_per_token": kv["kv_bytes"] / kv["kv_cells"], "threads": a.threads, "flash_attn": a.flash_attn}
            if c in decode_at:
                row.update(decode_speed(model, c, a.decode_tokens, int(cfg["vocab_size"])))
            print(json.dumps(row), flush=True)
            del model
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
