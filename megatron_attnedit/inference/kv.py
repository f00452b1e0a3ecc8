"""What a decode held and whether it was right: cache bytes measured from the engine's allocated
tensors against the attention target's formula, and the engine's logits against the stock forward.

Measured: the bytes of every tensor each layer's cache holds (allocated for the whole decode:
batch x slots), divided by the positions the decode cached and by the batch. The engine allocates
exactly the positions a decode asks for, and a sliding layer min(W, positions) slots, so a cache
that is what the formula says measures equal to it, layer by layer
(``targets.TARGETS[name].kv_bytes_per_layer``); one that keeps more or fewer positions does not.

Checked: ``verify_against_stock`` runs the model's own forward (transformers' code, no cache) over
each decoded sequence and compares the logits of every position the engine decoded from.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_attnedit.inference import attention_of
from megatron_attnedit.targets import TARGETS


def measure(engine, positions: int) -> dict:
    """Per-layer and whole-model cache bytes per token (per sequence) of ``engine`` holding ``positions``."""
    per_layer = [b / (positions * engine.batch) for b in engine.cache_bytes_per_layer()]
    return dict(measured_per_layer=per_layer, bytes_per_token=sum(per_layer), positions=positions,
                allocated_positions=engine.max_len, batch=engine.batch)


def formula_per_layer(cfg: dict, context: int, bytes_per_elem: int, base_cfg: Optional[dict] = None) -> List[float]:
    """The attention target's KV bytes per token of each layer at ``context`` tokens. ``base_cfg``:
    the config the target's shapes resolve against (the teacher's; default ``cfg`` itself)."""
    name, options = attention_of(cfg)
    base = dict(base_cfg or cfg, num_hidden_layers=int(cfg["num_hidden_layers"]))
    return TARGETS[name].kv_bytes_per_layer(base, options, context, bytes_per_elem)


def tolerance(dtype: torch.dtype) -> float:
    """Largest |engine - stock| logit difference accepted, relative to max(1, largest |logit|)."""
    return 1e-4 if dtype == torch.float32 else 5e-2


@torch.no_grad()
def verify_against_stock(model, decode) -> dict:
    """Teacher-forced check of an engine decode (``engine.Decode``): the stock forward over the
    decoded tokens must give the logits each step produced and the same greedy tokens. Returns
    max |diff|, the largest |logit|, whether every next token agrees, and ``ok`` within ``tolerance``."""
    p, n = decode.prompt_len, decode.step_logits.shape[0]
    ref = model(input_ids=decode.tokens[:, : p + n - 1]).logits[:, p - 1 :].float().transpose(0, 1)  # [n, b, vocab]
    got = decode.step_logits.float()
    out = dict(
        max_abs_diff=float((ref - got).abs().max()),
        max_abs_logit=float(ref.abs().max()),
        tokens_equal=bool(torch.equal(ref.argmax(-1), got.argmax(-1))),
        steps=n,
        tolerance=tolerance(next(model.parameters()).dtype),
    )
    out["ok"] = out["max_abs_diff"] <= out["tolerance"] * max(1.0, out["max_abs_logit"])
    return out


@torch.no_grad()
def verify_precision(model, decode) -> dict:
    """The check for a bf16 / fp16 decode. The engine and transformers round differently, so at many
    random layers their logits drift apart by a few percent of the largest logit (36 layers of the
    8B shape: 5%), and ``verify_against_stock``'s tolerance says nothing then. What matters is that
    the engine is no less precise than the stock forward: both against the stock forward with the
    same weights in fp32 (the parameters cast up for the check and back: exact), ``ok`` when the
    engine's largest error is within twice the stock bf16 forward's (tests/test_inference.py)."""
    p, n = decode.prompt_len, decode.step_logits.shape[0]
    seq = decode.tokens[:, : p + n - 1]
    params = list(model.parameters())
    dtypes = [t.dtype for t in params]
    half = model(input_ids=seq).logits[:, p - 1 :].float().transpose(0, 1)
    try:
        for t in params:
            t.data = t.data.float()
        full = model(input_ids=seq).logits[:, p - 1 :].float().transpose(0, 1)
    finally:
        for t, dt in zip(params, dtypes):
            t.data = t.data.to(dt)
    got = decode.step_logits.float()
    engine_err, stock_err = float((got - full).abs().max()), float((half - full).abs().max())
    return dict(
        engine_vs_fp32=engine_err,
        stock_vs_fp32=stock_err,
        engine_vs_stock=float((got - half).abs().max()),
        max_abs_logit=float(full.abs().max()),
        tokens_equal_fp32=bool(torch.equal(full.argmax(-1), got.argmax(-1))),
        steps=n,
        ok=engine_err <= 2 * stock_err,
    )
