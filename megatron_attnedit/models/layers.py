"""One layer's attention on its own, and the layers of a (wrapped) GPTModel: stage 1's plumbing.

Stage 1 calls the student's layer l ``self_attention`` and the teacher's on the same normalized
input (the output of the teacher's input_layernorm, [s, b, h]); both return comparable [s, b, h]
outputs (after linear_proj, bias added). RoPE:

* GQA layers of a plain GPTModel get the rotary embedding from the model, which computes it once
  per forward (``model.rotary_pos_emb(seq_len)``); ``rotary_pos_emb_for(model, seq_len)`` returns
  it, and ``attention_forward`` refuses a plain GQA layer without it (it would silently skip RoPE).
* MLA layers compute their own (decoupled RoPE, megatron's MLASelfAttention) and must get None.
* GQA layers of mixed MLA/GQA students compute their own too (``RotarySelfAttention`` in
  targets/mla/model.py), because GPTModel computes no rotary embedding when the config says
  multi_latent_attention.
Passing the model's embedding to every layer is always safe: ``attention_forward`` drops it for
layers that make their own.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core.transformer.multi_latent_attention import MultiLatentAttention


def computes_own_rope(attn) -> bool:
    """True for attention modules that build their rotary embedding themselves (MLA, and the GQA
    layers of mixed MLA/GQA students)."""
    return isinstance(attn, MultiLatentAttention) or getattr(attn, "computes_own_rope", False)
def rotary_pos_emb_for(model, seq_len: int) -> Optional[torch.Tensor]:
    """The rotary embedding GPTModel would pass its layers for ``seq_len`` tokens (full length,
    also under sequence parallelism), or None when the model computes none (MLA configs)."""
    m = model[0] if isinstance(model, (list, tuple)) else model
    m = getattr(m, "module", m)  # DDP / Float16Module wrappers
    while not hasattr(m, "rotary_pos_emb") and hasattr(m, "module"):
        m = m.module
    rope = getattr(m, "rotary_pos_emb", None)
    return None if rope is None else rope(seq_len)


def attention_forward(layer_module, normed_hidden: torch.Tensor, rotary_pos_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer_module.self_attention`` on ``normed_hidden`` [s, b, h] (the output of an
    input_layernorm; [s/tp, b, h] under sequence parallelism): the output after linear_proj with
    its bias added, [s, b, h]. ``rotary_pos_emb``: ``rotary_pos_emb_for(model, s)``; ignored by
    layers that compute their own RoPE, required by the others."""
    attn = layer_module.self_attention
    if computes_own_rope(attn):
        rotary_pos_emb = None
    elif rotary_pos_emb is None:
        raise ValueError(
            f"layer {layer_module.layer_number}: this attention applies RoPE from the model; pass rotary_pos_emb_for(model, seq_len)"
        )
    out, bias = attn(normed_hidden, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
    return out if bias is None else out + bias


def local_layers(model) -> List:
    """This rank's TransformerLayers (its pipeline stage) of a GPTModel (or a list of one)."""
    m = model[0] if isinstance(model, (list, tuple)) else model
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    return list(m.decoder.layers)


def global_layer_index(layer_module) -> int:
    """0-based index in the whole model (megatron's layer_number is global and 1-based)."""
    return int(layer_module.layer_number) - 1
