"""Long-context decode of the teacher and its students on one GPU: one JSON line per model and context.

    python launch/bench_decode.py --out launch/results/bench_decode_qwen3_8b_h100.json      # Qwen3-8B shape, 36 layers
    python launch/bench_decode.py --preset qwen3-30b-a3b --layers 4 --out launch/results/bench_decode_qwen3_30b_a3b_4l_h100.json
    python launch/bench_decode.py --preset qwen3-debug --device cpu --contexts 48,96 --steps 3 --max-batch 3   # CPU smoke

Random weights made on the device (bf16 on a GPU), the preset's shape cut to ``--layers`` layers:
  teacher   Qwen3 / Qwen3-MoE, GQA (transformers' class)
  mla       DeepSeek-V2 as the project exports it: latent 512 + RoPE key 64, qk_nope 128, v 128, full-rank query
  gate_swa  the project's GateSWA export (remote-code classes): window 4096, SSSSSF, per-head gate, sinks
each run by the decode engine (megatron_attnedit/inference), first checked against its own stock forward
(2 x 64 tokens, 8 steps: ``check``). Per context C, one sequence of C - (warmup
+ steps) random tokens is prefilled (timed: ``prefill_s``), decoded at batch 1 up to position C
(``batch1``), then the cache is grown to the most sequences that fit in the GPU's memory beside the
weights -- computed from the engine's allocated cache of one sequence, then confirmed by allocating
it and decoding (backing off by 10% on an out-of-memory) -- every sequence a copy of the prefilled
one, and timed again at the same positions (``max_batch``). Decode tokens/s count every sequence's
token per step. Cache bytes per token are measured from the allocated tensors (whole model, per
sequence, at C positions) next to the attention target's formula (targets/<name>: kv_bytes_per_layer).

With fewer layers than the preset (``--layers``) the figures are of that model; ``at_preset_layers``
says how each scales (cache and weights: linear in layers, the embedding and lm_head once;
decode and prefill time: about linear in layers, lm_head once). Imports no megatron-core.
Progress and the time of each phase go to stderr; the raw rows to ``--out`` (rewritten after each).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_attnedit import families  # noqa: E402
from megatron_attnedit.inference import kv  # noqa: E402
from megatron_attnedit.attention.decode_kernels import KERNELS  # noqa: E402
from megatron_attnedit.inference.engine import DecodeEngine, synchronize  # noqa: E402
from megatron_attnedit.families import PRESETS  # noqa: E402

GiB = 2**30
MODELS = ("teacher", "mla", "gate_swa")
# Student shapes per preset: the project's recipes (debug presets: the same structure, toy sizes).
STUDENT = {
    "qwen3-8b": dict(kv_lora_rank=512, rope=64, nope=128, v=128, window=4096),
    "qwen3-30b-a3b": dict(kv_lora_rank=512, rope=64, nope=128, v=128, window=4096),
    "qwen3-debug": dict(kv_lora_rank=32, rope=8, nope=16, v=16, window=32),
    "qwen3-moe-debug": dict(kv_lora_rank=32, rope=8, nope=16, v=16, window=32),
}


def log(msg: str) -> None:
    print(f"[bench_decode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python launch/bench_decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-8b", choices=sorted(STUDENT))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: the preset's)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--contexts", default="4096,32768,131072", help="comma-separated context lengths (tokens)")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them (the first captures the CUDA graph)")
    ap.add_argument("--pattern", default="SSSSSF", help="GateSWA layer pattern (S sliding, F full), tiled over the layers")
    ap.add_argument("--window", type=int, default=None, help="GateSWA window (default: 4096; debug presets 32)")
    ap.add_argument("--no-sinks", action="store_true", help="GateSWA without sink logits")
    ap.add_argument("--max-batch", type=int, default=None, help="cap on the largest batch tried (required on the CPU)")
    ap.add_argument("--reserve-gib", type=float, default=1.0, help="GPU memory left free beside weights and caches")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (to measure what graphs bring)")
    ap.add_argument("--attention-kernel", default="auto", choices=KERNELS,
                    help="decode attention: triton (one pass, attention/decode_triton.py), matmul (scores materialised), auto: triton where it runs")
    ap.add_argument("--profile", action="store_true",
                    help="also profile a few eager decode steps at the largest batch: the GPU kernels' share of a step (row 'profile')")
    ap.add_argument("--no-check", action="store_true", help="skip the check of each model's engine decode against its stock forward")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=None, help="write every row (and the run's settings) to this JSON file")
    a = ap.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.contexts = [int(c) for c in a.contexts.split(",") if c]
    bad = [m for m in a.models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {', '.join(bad)}; use {', '.join(MODELS)}")
    if min(a.contexts) <= a.steps + a.warmup:
        ap.error(f"every context must exceed --steps + --warmup ({a.steps + a.warmup}): the prompt is the rest")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; use --device cpu (with --max-batch) for a smoke run")
    if a.device == "cpu" and not a.max_batch:
        ap.error("--device cpu needs --max-batch (there is no device memory to fill)")
    return a


def hf_config(name: str, preset: dict, layers: int, a):
    """transformers config of ``name`` at the preset's shape with ``layers`` layers."""
    from transformers import AutoConfig, DeepseekV2Config

    base = {k: v for k, v in preset.items() if k not in ("model_type", "architectures", "torch_dtype")}
    base.update(num_hidden_layers=layers, max_position_embeddings=max(a.contexts))
    moe = preset["model_type"] == "qwen3_moe"
    if name == "teacher":
        return AutoConfig.for_model(preset["model_type"], **base)
    s = STUDENT[a.preset]
    if name == "mla":
        hd = families.head_dim(preset)
        experts = dict(n_routed_experts=base["num_experts"], num_experts_per_tok=base["num_experts_per_tok"],
                       moe_intermediate_size=base["moe_intermediate_size"], norm_topk_prob=True, first_k_dense_replace=0) if moe else \
            dict(n_routed_experts=0, num_experts_per_tok=None, first_k_dense_replace=layers)
        return DeepseekV2Config(
            vocab_size=base["vocab_size"], hidden_size=base["hidden_size"], intermediate_size=base["intermediate_size"],
            num_hidden_layers=layers, num_attention_heads=base["num_attention_heads"], num_key_value_heads=base["num_attention_heads"],
            q_lora_rank=None, kv_lora_rank=s["kv_lora_rank"], qk_rope_head_dim=s["rope"], qk_nope_head_dim=s["nope"], v_head_dim=s["v"],
            rope_parameters={"rope_type": "default", "rope_theta": base["rope_theta"] ** (s["rope"] / hd)},  # the export's "high" RoPE
            rms_norm_eps=base["rms_norm_eps"], max_position_embeddings=base["max_position_embeddings"], tie_word_embeddings=False,
            n_shared_experts=0, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1, **experts)
    from megatron_attnedit.targets.gate_swa.hf.configuration_gateswa import GateSWAConfig, GateSWAMoeConfig

    kinds = [a.pattern[i % len(a.pattern)] for i in range(layers)]
    return (GateSWAMoeConfig if moe else GateSWAConfig)(
        **base, use_sliding_window=True, sliding_window=a.window or s["window"], output_gate="head",
        attention_sinks=not a.no_sinks, layer_types=["sliding_attention" if k == "S" else "full_attention" for k in kinds])


def build(name: str, config, device, dtype):
    """Random weights made on ``device`` directly (no host copy of an 8B model)."""
    from transformers import AutoModelForCausalLM

    if name == "gate_swa":
        from megatron_attnedit.targets.gate_swa.hf import modeling_gateswa as m

        cls = m.GateSWAMoeForCausalLM if "moe" in config.model_type else m.GateSWAForCausalLM
    else:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def formula(cfg: dict, context: int, bpe: int):
    """The target's KV bytes per token, per layer, of a model config (its attention recognised as
    the evaluation does, the formula the target's own)."""
    return kv.formula_per_layer(cfg, context, bpe)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_bytes(device) -> int:
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def step_workspace(config, max_len: int) -> int:
    """Bytes a decode step needs per sequence beyond its cache: fp32 scores, masked scores and
    probabilities plus their bf16 copy for every query head and position, and the logits."""
    return config.num_attention_heads * max_len * 16 + config.vocab_size * 12


def largest_batch(engine: DecodeEngine, prompt_len: int, a, per_seq: int) -> dict:
    """Grow the batch-1 cache (position ``prompt_len``) to the most sequences that fit, then time them."""
    device = engine.device
    # workspace of a step that grows with the batch: fp32 scores and probabilities of every query head, and the logits
    step_ws = step_workspace(engine.model.config, engine.max_len)
    # the prefilled sequence, kept in host memory while the batch is grown: on the device it would
    # take one sequence's room from the batch (the first H100 run counted one sequence too few)
    seed = [[t[:1].to("cpu") for t in layer] for layer in engine.caches()]
    engine.release()  # its batch-1 step (CUDA graph) and cache go
    if device.type == "cuda":
        computed = int((free_bytes(device) - a.reserve_gib * GiB) // (per_seq + step_ws))
    else:
        computed = None
    batch = min(x for x in (computed, a.max_batch) if x is not None)
    tries = []
    while batch >= 1:
        try:
            engine.allocate(batch, source=seed)
            engine.reset(prompt_len)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step_s = engine.time_steps(a.steps, a.warmup)
            tries.append(dict(batch=batch, fits=True))
            peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
            out = dict(sequences=batch, computed=computed, tries=tries, step_ms=1e3 * step_s, tokens_per_s=batch / step_s,
                       cache_GiB=sum(engine.cache_bytes_per_layer()) / GiB, peak_allocated_GiB=peak)
            if a.profile and device.type == "cuda":
                out["profile"] = profile_steps(engine, prompt_len)
            return out
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            tries.append(dict(batch=batch, fits=False))
            engine.release()
            free_bytes(device)
            batch = min(batch - 1, int(batch * 0.9))
    return dict(sequences=0, computed=computed, tries=tries)


def profile_steps(engine: DecodeEngine, start: int, steps: int = 3, top: int = 12) -> dict:
    """Where a decode step's GPU time goes: ``steps`` eager steps from position ``start`` (the
    captured graph dropped first, its memory back to the allocator) under torch.profiler, the GPU
    kernels grouped by name, most time first, in ms per step. The engine is left at ``start``."""
    from torch.profiler import ProfilerActivity, profile

    engine.reset(start)
    engine._graph = None
    free_bytes(engine.device)
    ids = torch.zeros(engine.batch, 1, dtype=torch.long, device=engine.device)
    try:
        with torch.no_grad():
            engine._step(ids)  # eager warm-up (lazy inits, Triton's compile cache)
            synchronize(engine.device)
            engine.pos.fill_(start)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    engine._step(ids)
                synchronize(engine.device)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
    finally:
        engine.pos.fill_(start)
    rows = sorted(((e.key, e.device_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    attention = sum(r[1] for r in rows if any(w in r[0].lower() for w in ("_partial", "_combine", "softmax", "logsumexp", "masked_fill")))
    return dict(steps=steps, gpu_ms_per_step=total, kernels=[dict(name=n[:120], ms_per_step=t, calls_per_step=c) for n, t, c in rows[:top]],
                attention_named_ms_per_step=attention)


def decode_check(model, device, a) -> dict:
    """The engine (CUDA graphs and the chosen attention kernel included) against the model's own
    forward on a short batch of two, 64 tokens + 8 steps: in fp32 kv.verify_against_stock (1e-4 of
    the largest logit); in bf16 kv.verify_precision (the engine no further from the fp32 forward
    than transformers' bf16 forward is, within 2x; both figures kept)."""
    g = torch.Generator().manual_seed(1)
    engine = DecodeEngine(model, batch=2, max_len=72, attention_kernel=a.attention_kernel)
    decode = engine.generate(torch.randint(0, model.config.vocab_size, (2, 64), generator=g).to(device), 8)
    kernels = engine.kernels_used()
    engine.release()
    if next(model.parameters()).dtype == torch.float32:
        return dict(kv.verify_against_stock(model, decode), kernels=kernels)
    return dict(kv.verify_precision(model, decode), kernels=kernels)


def bench_context(name: str, model, config, context: int, a, weights: dict) -> dict:
    device, t_all = next(model.parameters()).device, time.perf_counter()
    bpe = next(model.parameters()).element_size()
    prompt_len = context - a.steps - a.warmup
    engine = DecodeEngine(model, batch=1, max_len=context, cuda_graphs=False if a.no_cuda_graphs else None,
                          attention_kernel=a.attention_kernel)
    g = torch.Generator().manual_seed(context)
    engine.prefill(torch.randint(0, config.vocab_size, (1, min(prompt_len, 512)), generator=g).to(device))  # first calls: kernel set-up
    engine.reset()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=g).to(device)
    synchronize(device)
    t0 = time.perf_counter()
    engine.prefill(prompt)
    synchronize(device)
    prefill_s = time.perf_counter() - t0
    log(f"{name} {context}: prefill of {prompt_len} tokens {prefill_s:.2f} s")
    step_s = engine.time_steps(a.steps, a.warmup)  # batch 1, up to position `context`
    measured = kv.measure(engine, context)
    per_layer_formula = formula(config.to_dict(), context, bpe)
    per_seq = sum(engine.cache_bytes_per_layer())
    log(f"{name} {context}: batch 1 {1e3 * step_s:.2f} ms/step; cache {per_seq / GiB:.3f} GiB/sequence")
    big = largest_batch(engine, prompt_len, a, per_seq)
    log(f"{name} {context}: largest batch {big['sequences']} (computed {big['computed']}) "
        f"{big.get('tokens_per_s', 0):.1f} tok/s ({big.get('step_ms', 0):.2f} ms/step)")
    row = dict(
        model=name, context=context, attention=engine.attention,
        prefill=dict(tokens=prompt_len, seconds=prefill_s),
        batch1=dict(step_ms=1e3 * step_s, tokens_per_s=1.0 / step_s),
        max_batch=big,
        cache=dict(bytes_per_token_measured=measured["bytes_per_token"], bytes_per_token_formula=sum(per_layer_formula),
                   per_layer_measured=measured["measured_per_layer"], per_layer_formula=per_layer_formula,
                   equal=measured["measured_per_layer"] == per_layer_formula, bytes_per_sequence=per_seq),
        memory=weights,
        decode_path=dict(cuda_graphs=engine.cuda_graphs, graph_error=engine.graph_error, attention_kernel=a.attention_kernel,
                         kernels_used=engine.kernels_used()),
    )
    engine.release()
    del engine
    free_bytes(device)
    row["seconds"] = time.perf_counter() - t_all
    return row


SCALING = ("cache bytes per token (the formula, which the measured cache equals layer by layer) and per-layer weights are linear "
           "in layers, embedding and lm_head counted once; max_batch_computed is computed from those, not allocated; a decode "
           "step and the prefill read every layer's weights and cache once, so their time grows about linearly with the layers: "
           "tokens/s here are the measured ones divided by the layer ratio (a lower bound: lm_head is not repeated)")


def at_preset_layers(row: dict, config, name: str, full: int, a, memory: dict) -> dict:
    """How the row's figures scale from its layers to the preset's ``full`` layers (module docstring)."""
    f = full / config.num_hidden_layers
    at_full = dict(config.to_dict(), num_hidden_layers=full)
    if name == "gate_swa":  # the pattern tiled over the preset's layers
        at_full["layer_types"] = ["sliding_attention" if a.pattern[i % len(a.pattern)] == "S" else "full_attention" for i in range(full)]
    per_token = sum(formula(at_full, row["context"], memory["bytes_per_elem"]))
    weights = memory["other_weights_GiB"] + memory["layer_weights_GiB"] * f
    step_ws = step_workspace(config, row["context"])
    room = (memory["free_before_weights_GiB"] - weights - a.reserve_gib) * GiB if memory.get("free_before_weights_GiB") else None
    return dict(
        layers=full,
        how=SCALING,
        cache_bytes_per_token=per_token,
        weights_GiB=weights,
        max_batch_computed=int(room // (per_token * row["context"] + step_ws)) if room else None,
        batch1_tokens_per_s_lower_bound=row["batch1"]["tokens_per_s"] / f,
        prefill_seconds_estimate=row["prefill"]["seconds"] * f,
    )


def write(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = PRESETS[a.preset]
    full = int(preset["num_hidden_layers"])
    layers = a.layers or full
    result = dict(command="python launch/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                  preset=a.preset, layers=layers, preset_layers=full, dtype=str(dtype).replace("torch.", ""), rows=[], complete=False)
    import transformers

    result["transformers"] = transformers.__version__
    for name in a.models:
        t0 = time.perf_counter()
        free_before = free_bytes(device)
        config = hf_config(name, preset, layers, a)
        model = build(name, config, device, dtype)
        synchronize(device)
        in_layers = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        memory = dict(total_GiB=torch.cuda.mem_get_info(device)[1] / GiB if device.type == "cuda" else None,
                      free_before_weights_GiB=free_before / GiB if device.type == "cuda" else None,
                      weights_GiB=total / GiB, layer_weights_GiB=in_layers / GiB, other_weights_GiB=(total - in_layers) / GiB,
                      bytes_per_elem=next(model.parameters()).element_size())
        log(f"{name}: {total / GiB:.2f} GiB of random weights built in {time.perf_counter() - t0:.1f} s")
        check = None if a.no_check else decode_check(model, device, a)
        if check and "engine_vs_fp32" in check:
            log(f"{name}: 2 x 64 tokens + 8 steps against the fp32 forward: engine {check['engine_vs_fp32']:.3g}, transformers' "
                f"bf16 forward {check['stock_vs_fp32']:.3g} (largest |logit| {check['max_abs_logit']:.3g}): "
                f"{'as precise' if check['ok'] else 'LESS PRECISE'}; kernels {check['kernels']}")
        elif check:
            log(f"{name}: engine vs the stock forward, 2 x 64 tokens + 8 steps: max |diff| {check['max_abs_diff']:.3g} "
                f"(largest |logit| {check['max_abs_logit']:.3g}), {'within' if check['ok'] else 'BEYOND'} tolerance")
        for context in a.contexts:
            row = dict(bench="decode", device=result["device"], preset=a.preset, layers=layers,
                       **bench_context(name, model, config, context, a, memory), check=check)
            if layers != full:
                row["at_preset_layers"] = at_preset_layers(row, config, name, full, a, memory)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            if a.out:
                write(a.out, result)
        del model
        free_bytes(device)
    result["complete"], result["seconds"] = True, time.perf_counter() - t_start
    if a.out:
        write(a.out, result)
    log(f"done in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
