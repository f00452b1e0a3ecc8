"""Teachers and students as megatron-core's ``HybridModel`` (megatron-core >= 0.19, where ``GPTModel``
is deprecated): a model is a pattern of layer symbols, and one decoder layer of ours is two of them.

  ``*-``  attention (GQA, or GateSWA's gated sliding-window / full attention) + dense MLP
  ``*E``  attention + MoE
  ``+-`` / ``+E``  MLA + MLP / MoE
  ``|``   a pipeline-stage boundary, where our even PP split puts one

megatron refuses ``*`` and ``+`` in one pattern; a mixed MLA/GQA student is an MLA model (its config
says ``multi_latent_attention``, so the model builds no shared RoPE) and writes ``+`` for every
attention layer, its GQA layers computing their own RoPE (``targets/mla/model.RotarySelfAttention``).

Our layers differ per layer (which attention, its window, a borrowed MLP), where HybridStack builds
one spec per symbol: each slot is a ``_PerLayer`` class that builds the spec of the layer its
symbol belongs to. The specs are the local ones (``LocalRMSNorm``, our core attention; megatron's
hybrid specs need transformer-engine), and ``LocalHybridStack`` adds the final norm without it.

Layer numbers are decoder-layer numbers: the attention and MLP layers of decoder layer i both carry
``layer_number = i + 1``. So everything indexed by layer keeps its meaning -- per-layer config lists
(``window_attn_skip_freq``, ``moe_layer_freq``), ``models.layers.global_layer_index`` -- and
the checkpoint keys are GPTModel's (``LocalHybridStack.sharded_state_dict``: stacked layers, the local
spec's norm key map): a checkpoint written by either model loads into the other. Module names do
differ (``decoder.layers.{2i}.self_attention.*``, ``decoder.layers.{2i+1}.mlp.*``):
``models.layers.gpt_layout_name`` maps them back for the conversion tables.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_attnedit.models.layers import decoder_layer_of_symbols


def layer_pattern(attention: Sequence[str], moe: Sequence[bool], stages: int) -> str:
    """The pattern of ``len(attention)`` decoder layers (attention symbol, MoE or not) split evenly
    into ``stages`` pipeline stages: ``["*", "*"], [False, True], 2`` -> ``"*-|*E"``."""
    per_layer = [a + (Symbols.MOE if m else Symbols.MLP) for a, m in zip(attention, moe)]
    n = len(per_layer) // stages
    return Symbols.PIPE.join("".join(per_layer[k * n : (k + 1) * n]) for k in range(stages))


def attention_layer_spec(attention: ModuleSpec, norm, keys_map: dict) -> ModuleSpec:
    """The attention half of a decoder layer (its input norm, attention, residual)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={k: v for k, v in keys_map.items() if k.startswith("input_layernorm")},
        ),
    )


def mlp_layer_spec(mlp, norm, keys_map: dict, moe: bool) -> ModuleSpec:
    """The MLP half of a decoder layer (its pre-MLP norm, dense MLP or MoE, residual). An MoE layer is
    a plain TransformerLayer, as in megatron's inference hybrid spec (MoETransformerLayer adds only
    CUDA-graph capture paths), so the computation is GPTModel's layer's, step for step."""
    return ModuleSpec(
        module=TransformerLayer if moe else MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={k: v for k, v in keys_map.items() if k.startswith("pre_mlp_layernorm")},
        ),
    )


def _per_layer(specs: Dict[int, ModuleSpec], layer_of: List[int]) -> type:
    """A slot of the stack: builds, for the symbol HybridStack numbers ``layer_number`` (1-based over
    the whole pattern), the spec of its decoder layer, numbered as that decoder layer."""

    def __new__(cls, config, layer_number: int, **kwargs):
        symbol = layer_number - 1
        kwargs["add_layer_offset"] = False
        if kwargs.get("pp_layer_offset") is not None:  # attention layers (for megatron's inference cache)
            kwargs["pp_layer_offset"] = layer_of[kwargs["pp_layer_offset"]] if kwargs["pp_layer_offset"] < len(layer_of) else 0
        return build_module(specs[symbol], config=config, layer_number=layer_of[symbol] + 1, **kwargs)

    return type("PerLayerSlot", (), {"__new__": __new__, "__doc__": "builds the spec of the symbol's decoder layer"})


class LocalHybridStack(HybridStack):
    """HybridStack with the local spec's final norm (megatron's is transformer-engine's TENorm),
    registered as ``final_layernorm``: GPTModel's module and checkpoint name."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, post_process: bool = True, final_norm=None, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, post_process=post_process, **kwargs)
        self.post_layer_norm = post_layer_norm
        if config.recompute_granularity == "full" and config.recompute_num_layers and len(self.layers):
            # megatron counts stack layers (symbols); recompute_num_layers counts decoder layers
            per_layer = len(self.layers) // len({layer.layer_number for layer in self.layers})
            self.config = copy.copy(config)
            self.config.recompute_num_layers = config.recompute_num_layers * per_layer
        if post_process and post_layer_norm:
            self.final_layernorm = final_norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

    @property
    def final_norm(self):  # HybridStack.forward's name for it
        return self.final_layernorm

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """GPTModel's checkpoint layout (megatron's ``TransformerBlock.sharded_state_dict``): the
        layers' tensors stacked along a layer axis (``decoder.layers.mlp.linear_fc1.weight`` of
        shape [num_layers, ...]) unless the layers are not all alike (an MoE pattern and the other
        cases below), then one key per layer (``decoder.layers.{i}.``) -- where HybridStack always
        writes one key per symbol. The two halves of a decoder layer share its layer number and
        hold different parameter names, so together they fill GPTModel's entries of that layer."""
        stacked = not _non_homogeneous(self.config, metadata)
        out = {}
        for i, layer in enumerate(self.layers):
            local, g = f"{prefix}layers.{i}.", layer.layer_number - 1
            if stacked:
                sharded_prefix, offsets = f"{prefix}layers.", [(0, g, self.config.num_layers)]
            else:
                sharded_prefix, offsets = f"{prefix}layers.{g}.", []
            layer_sd = layer.sharded_state_dict(local, offsets, metadata)
            replace_prefix_for_sharding(layer_sd, local, sharded_prefix)
            out.update(layer_sd)
        for name, module in self.named_children():
            if module is not self.layers:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group))
        return out


def _non_homogeneous(config, metadata: Optional[dict]) -> bool:
    """TransformerBlock.sharded_state_dict's rule (megatron-core 0.19.2) for one key per layer."""
    meta = metadata or {}
    moe_freq, linear_freq = config.moe_layer_freq, config.linear_attention_freq
    return bool(
        meta.get("non_homogeneous_layers", False) or meta.get("singleton_local_shards", False)
        or config.hetereogenous_dist_checkpoint or config.heterogeneous_block_specs
        or isinstance(moe_freq, list) or (isinstance(moe_freq, int) and moe_freq > 1)
        or isinstance(linear_freq, list) or (isinstance(linear_freq, int) and linear_freq > 1)
    )


class LocalHybridModel(HybridModel):
    """HybridModel whose checkpoint is GPTModel's: without the output layer's (empty) extra state,
    which GPTModel.sharded_state_dict drops ("old GPT checkpoints only stored the output layer
    weight key")."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        extra = sd.pop(f"{prefix}output_layer._extra_state", None)
        assert not (extra and extra.data), f"the output layer's extra state holds data: {extra}"
        return sd


def build(config, layers: Sequence[Tuple[str, ModuleSpec, ModuleSpec, bool]], stages: int, final_norm, **model_kwargs) -> LocalHybridModel:
    """A HybridModel of ``layers`` -- per decoder layer (attention symbol, attention-layer spec,
    MLP-layer spec, MoE or not) -- split into ``stages`` pipeline stages. ``model_kwargs``: as
    GPTModel's (vocab, RoPE, pre/post process, tied embeddings)."""
    pattern = layer_pattern([a for a, _, _, _ in layers], [m for _, _, _, m in layers], stages)
    layer_of = decoder_layer_of_symbols(pattern)
    attention = {2 * i: spec for i, (_, spec, _, _) in enumerate(layers)}
    mlp = {2 * i + 1: spec for i, (_, _, spec, _) in enumerate(layers)}
    slot_a, slot_m = _per_layer(attention, layer_of), _per_layer(mlp, layer_of)
    stack = ModuleSpec(
        module=LocalHybridStack,
        params={"final_norm": final_norm},
        submodules=HybridStackSubmodules(attention_layer=slot_a, mla_layer=slot_a, mlp_layer=slot_m, moe_layer=slot_m),
    )
    return LocalHybridModel(config=config, hybrid_stack_spec=stack, hybrid_layer_pattern=pattern, **model_kwargs)
