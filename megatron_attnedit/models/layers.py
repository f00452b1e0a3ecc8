"""One layer's attention on its own, and the decoder layers of a (wrapped) model: stage 1's plumbing.

A decoder layer is a GPTModel's TransformerLayer (megatron-core 0.16), or on a HybridModel (0.19 on,
``models/hybrid.py``) a ``DecoderLayer``: the attention layer and the MLP layer of its two pattern
symbols, seen as one, with the same attributes (``input_layernorm``, ``self_attention``,
``pre_mlp_layernorm``, ``mlp``, ``layer_number``). ``gpt_layout_name`` names a HybridModel's
parameters as GPTModel names them (the conversion tables' names).

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

import re
from typing import Callable, List, Optional

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


# Pattern symbols (megatron.core.models.hybrid.hybrid_layer_allocation.Symbols) that begin a
# decoder layer of ours (attention kinds); the others ("-" MLP, "E" MoE) complete the one before.
_LAYER_START = "*+DGM"


def decoder_layer_of_symbols(pattern: str) -> List[int]:
    """For each symbol of a hybrid layer pattern (stage boundaries ``|`` dropped), the 0-based
    decoder layer it belongs to: ``"*-*E"`` -> ``[0, 0, 1, 1]``."""
    out, layer = [], -1
    for sym in pattern.replace("|", ""):
        layer += sym in _LAYER_START or layer < 0
        out.append(layer)
    return out


class DecoderLayer:
    """One decoder layer of a HybridModel: its attention layer (``*`` / ``+``) and its MLP layer
    (``-`` / ``E``). Forward hooks go on the MLP layer, whose output is the decoder layer's."""

    def __init__(self, attention, mlp_layer):
        self.attention_layer, self.mlp_layer = attention, mlp_layer

    input_layernorm = property(lambda self: self.attention_layer.input_layernorm)
    self_attention = property(lambda self: self.attention_layer.self_attention)
    pre_mlp_layernorm = property(lambda self: self.mlp_layer.pre_mlp_layernorm)
    mlp = property(lambda self: self.mlp_layer.mlp)
    layer_number = property(lambda self: self.attention_layer.layer_number)  # both halves carry it

    def register_forward_hook(self, hook, **kwargs):
        return self.mlp_layer.register_forward_hook(hook, **kwargs)

    def get_submodule(self, path: str):
        """``mlp.router``, ``self_attention.core_attention``, ...: from the half that has it (each
        half also holds IdentityOp stand-ins under the other's names)."""
        if not path:
            return self
        first, _, rest = path.partition(".")
        if first not in ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp"):
            raise AttributeError(f"a decoder layer has no {first}")
        module = getattr(self, first)
        return module.get_submodule(rest) if rest else module

    def parameters(self):
        yield from self.attention_layer.parameters()
        yield from self.mlp_layer.parameters()


def unwrap(model):
    """The model (GPTModel / HybridModel) inside a list of one and megatron's wrappers."""
    m = model[0] if isinstance(model, (list, tuple)) else model
    while hasattr(m, "module") and not hasattr(m, "decoder"):
        m = m.module
    return m


def _symbol_layers(decoder) -> Optional[List[int]]:
    """For a HybridStack, the local decoder-layer index of each of its layers; None for GPTModel's."""
    types = getattr(decoder, "layer_type_list", None)
    return None if types is None else decoder_layer_of_symbols("".join(types))


def local_layers(model) -> List:
    """This rank's decoder layers (its pipeline stage) of a model (or a list of one)."""
    decoder = unwrap(model).decoder
    of = _symbol_layers(decoder)
    if of is None:
        return list(decoder.layers)
    halves: List[List] = [[] for _ in range(of[-1] + 1 if of else 0)]
    for layer, i in zip(decoder.layers, of):
        halves[i].append(layer)
    return [DecoderLayer(*h) for h in halves]


_SYMBOL = re.compile(r"^decoder\.layers\.(\d+)\.")


def gpt_layout_name(model) -> Callable[[str], str]:
    """Name of a parameter (or module) of ``model`` -> its GPTModel name: on a HybridModel
    ``decoder.layers.{symbol}.x`` -> ``decoder.layers.{local decoder layer}.x``; identity on GPTModel."""
    of = _symbol_layers(unwrap(model).decoder)
    if of is None:
        return lambda name: name
    return lambda name: _SYMBOL.sub(lambda m: f"decoder.layers.{of[int(m.group(1))]}.", name, count=1)


def from_gpt_layout(model, state: dict) -> dict:
    """A module state dict in GPTModel's names (a legacy checkpoint's) in ``model``'s own names."""
    gpt_name = gpt_layout_name(model)
    own = {gpt_name(k): k for k in unwrap(model).state_dict(keep_vars=True)}
    return {own.get(k, k): v for k, v in state.items()}


def global_layer_index(layer_module) -> int:
    """0-based index in the whole model (megatron's layer_number is global and 1-based)."""
    return int(layer_module.layer_number) - 1
