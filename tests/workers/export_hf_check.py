"""Loads each HF export the way a user would -- offline, AutoModelForCausalLM, remote code only for
GateSWA -- and measures it against the megatron student. Run with HF_HUB_OFFLINE=1.

    python export_hf_check.py WORK CASE [CASE ...]

Per case, into WORK/hf_check.json: the loaded class, max |HF - megatron| logits (fp32, CPU), and
for a greedy ``generate`` with the HF cache: the new tokens and max |per-step logits - logits of
one full forward over the generated sequence| (the cache -- sliding-window layers included --
gives what recomputing everything gives); the same for the project's decode engine (inference/) on
both token rows, with its allocated cache bytes per layer. MoE cases also report the difference under DeepSeek's
renormalised router (``norm_topk_prob``), which stock transformers' DeepseekV2 does not apply.
"""

import inspect
import json
import os
import sys
import warnings

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

CACHE_KEYWORD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

warnings.filterwarnings("ignore")


def renormalising_router(router, hidden_states):
    """DeepseekV2TopkRouter.forward plus DeepSeek's ``norm_topk_prob`` (what vLLM/SGLang compute)."""
    logits, weights, indices = router._stock_forward(hidden_states)
    return logits, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), indices


@torch.no_grad()
def check(hf_dir, megatron_logits, tokens, prompt_len=10, new_tokens=14):
    from transformers import AutoModelForCausalLM

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    remote = "auto_map" in cfg
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True, trust_remote_code=remote)
    model.eval()
    out = {"class": type(model).__name__, "module": type(model).__module__, "remote_code": remote}
    out["max_diff"] = (model(tokens).logits.float() - megatron_logits).abs().max().item()
    gen = model.generate(tokens[:1, :prompt_len], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full = model(gen.sequences).logits
    steps = torch.stack(gen.logits, dim=1)
    out["generated"] = gen.sequences[0, prompt_len:].tolist()
    out["cache_vs_full_forward"] = (steps - full[:, prompt_len - 1 : -1]).abs().max().item()
    plain = model.generate(tokens[:1, :prompt_len], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=False, pad_token_id=0)
    out["generated_uncached"] = plain[0, prompt_len:].tolist()
    # what the cache holds after the prompt, per layer (a cache passed by the keyword the model's
    # transformers version reads is filled; one the attention never sees stays empty)
    cache = DynamicCache(config=model.config)
    model(tokens[:1, :prompt_len], use_cache=True, **{CACHE_KEYWORD: cache})
    out["cached_positions"] = [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0 for layer in cache.layers]
    # the project's decode engine on the export, both sequences: every step against the full forward, and its cache
    from megatron_attnedit.inference import kv
    from megatron_attnedit.inference.engine import DecodeEngine

    engine = DecodeEngine(model, batch=tokens.shape[0], max_len=prompt_len + new_tokens - 1)
    dec = engine.generate(tokens[:, :prompt_len], new_tokens - 1)
    out["engine"] = kv.verify_against_stock(model, dec)
    out["engine_generated"] = dec.tokens[0, prompt_len:].tolist()
    out["engine_cache"] = kv.measure(engine, dec.positions)
    if cfg.get("model_type") == "deepseek_v2" and cfg.get("first_k_dense_replace", 0) < cfg["num_hidden_layers"]:
        router_cls = type(model.model.layers[-1].mlp.gate)
        router_cls._stock_forward = router_cls.forward
        router_cls.forward = renormalising_router
        out["max_diff_renormalised"] = (model(tokens).logits.float() - megatron_logits).abs().max().item()
        router_cls.forward = router_cls._stock_forward
    return out


def main():
    work, cases = sys.argv[1], sys.argv[2:]
    tokens = torch.load(os.path.join(work, "tokens.pt"))
    result = {c: check(os.path.join(work, c, "hf"), torch.load(os.path.join(work, c, "megatron_logits.pt")), tokens) for c in cases}
    json.dump(result, open(os.path.join(work, "hf_check.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
