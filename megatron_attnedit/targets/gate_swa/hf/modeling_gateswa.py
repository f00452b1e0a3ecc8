"""GateSWA (megatron-attnedit): Qwen3 / Qwen3-MoE / Llama with gated, hybrid sliding-window attention.

Loaded with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Everything but
the attention is transformers' own Qwen3 / Qwen3-MoE / Llama (the teacher's family; Llama has no
q/k-norm, and its model gets one mask per layer type here as Qwen3-MoE's does). Per layer i:

* ``config.layer_types[i]`` is "sliding_attention" (query t sees keys t-W < j <= t, W =
  ``config.sliding_window``) or "full_attention";
* the attention output of every head is multiplied by sigmoid(x W_g + b_g) before o_proj, x being
  the layer's attention input (``output_gate``: "head" = one value per head, "channel" = one per
  channel). Training uses 2 sigmoid(.); the exporter folds that factor 2 into o_proj;
* with ``attention_sinks`` each head has a learnable sink logit: softmax over [scores, sink], the
  sink's value being zero (computed in eager attention; other kernels are used without sinks).

KV cache: transformers' ``DynamicCache(config)`` gives sliding layers a ``DynamicSlidingWindowLayer``
(it keeps the last W-1 keys, the new token makes W) and full layers a plain one; masks come from
transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask`` per layer type.
The cache keyword: transformers 5.25 passes it as ``cache=`` (``past_key_values`` is deprecated
there, its removal planned for 5.40); earlier 5.x releases pass ``past_key_values=``. An attention
that reads only one of them silently runs without a cache under the other (generation then
diverges at the second token), so this code takes either (``_cache_of``). The project's tests
check cached greedy generation against the uncached forward on the transformers version it pins.
"""

import inspect

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3ForCausalLM, apply_rotary_pos_emb, eager_attention_forward, repeat_kv
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM, LlamaModel
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeModel
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_gateswa import GateSWAConfig, GateSWALlamaConfig, GateSWAMoeConfig

# The name under which this transformers passes the cache to masks, layers and model outputs.
_CACHE_KEYWORD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

# The checkpoint stores routed experts one by one, as Qwen3-MoE checkpoints do; transformers merges
# them on load by model type, and does so for custom code only when the mapping is registered.
register_checkpoint_conversion_mapping(
    GateSWAMoeConfig.model_type, get_checkpoint_conversion_mapping("qwen3_moe"), overwrite=True
)


def _cache_of(kwargs, *named):
    """The KV cache, whichever keyword carried it (``cache`` from transformers 5.25 on,
    ``past_key_values`` before); removes both from ``kwargs``."""
    found = [c for c in named if c is not None]
    for key in ("cache", "past_key_values"):
        value = kwargs.pop(key, None)
        if value is not None:
            found.append(value)
    return found[0] if found else None


def _causal_mask(q_len, k_len, window, device):
    """Boolean [q, k] mask, queries aligned to the last keys; True where attention is allowed."""
    q = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)
    k = torch.arange(k_len, device=device).unsqueeze(0)
    allowed = k <= q
    return allowed & (k > q - window) if window is not None else allowed


def attention_with_sinks(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with one sink logit per head; [b, s, heads, head_dim] out, as transformers'."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    if attention_mask is None:  # sdpa masks may leave plain causal attention to is_causal
        attention_mask = _causal_mask(scores.shape[-2], scores.shape[-1], module.sliding_window, scores.device)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    sinks = module.sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), probs


class _GatedSlidingAttention:
    """The edit, on top of the family's attention (its q/k/v/o projections, q/k-norm if it has one)."""

    def _add_gate(self, config, layer_idx):
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        self.gate_width = 1 if config.output_gate == "head" else self.head_dim
        self.output_gate = nn.Linear(config.hidden_size, config.num_attention_heads * self.gate_width, bias=True)
        self.sinks = nn.Parameter(torch.zeros(config.num_attention_heads)) if config.attention_sinks else None

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        cache = _cache_of(kwargs, cache)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q_norm, k_norm = getattr(self, "q_norm", _identity), getattr(self, "k_norm", _identity)
        query = q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key = k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if self.sinks is not None:
            attention = attention_with_sinks
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs,
        )
        gate = torch.sigmoid(self.output_gate(hidden_states)).view(*input_shape, -1, self.gate_width)
        out = (out.reshape(*input_shape, gate.shape[-2], -1) * gate).reshape(*input_shape, -1)
        return self.o_proj(out), weights


def _identity(x):
    return x


class GateSWAAttention(_GatedSlidingAttention, Qwen3Attention):
    def __init__(self, config, layer_idx):
        Qwen3Attention.__init__(self, config, layer_idx)
        self._add_gate(config, layer_idx)


class GateSWALlamaAttention(_GatedSlidingAttention, LlamaAttention):
    def __init__(self, config, layer_idx):
        LlamaAttention.__init__(self, config, layer_idx)
        self._add_gate(config, layer_idx)


def _use_gateswa_attention(layers, config, attention=GateSWAAttention):
    for i, layer in enumerate(layers):
        layer.self_attn = attention(config, i)


def _forward_by_layer_type(model, output_class, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                           inputs_embeds=None, use_cache=None, **kwargs):
    """A decoder body's forward with one mask per layer type (full / sliding)."""
    cache = _cache_of(kwargs, cache)
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if use_cache and cache is None:
        cache = DynamicCache(config=model.config)
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(input_ids)
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
    mask_kwargs = dict(config=model.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids, **{_CACHE_KEYWORD: cache})
    masks = attention_mask  # generate may already have built one mask per layer type
    if not isinstance(masks, dict):
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in model.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
    hidden_states = inputs_embeds
    position_embeddings = model.rotary_emb(hidden_states, position_ids=position_ids)
    for layer, kind in zip(model.layers, model.config.layer_types):
        hidden_states = layer(hidden_states, attention_mask=masks[kind], position_ids=position_ids,
                              use_cache=use_cache, **{_CACHE_KEYWORD: cache},
                              position_embeddings=position_embeddings, **kwargs)
    return output_class(last_hidden_state=model.norm(hidden_states), **{_CACHE_KEYWORD: cache})


class GateSWAForCausalLM(Qwen3ForCausalLM):
    """Qwen3 (dense) base: its model already builds one mask per layer type."""

    config_class = GateSWAConfig

    def __init__(self, config):
        super().__init__(config)
        _use_gateswa_attention(self.model.layers, config)
        self.post_init()


class _OneMaskPerLayerType:
    """For a base whose model applies one mask to every layer (Qwen3-MoE: one window for all layers
    or none; Llama: no window): GateSWA attention in every layer, and the base's forward with one
    mask per layer type. Goes first among the bases; a subclass names ``output_class`` and, where
    the family's attention is not Qwen3's, ``attention_class``."""

    output_class = BaseModelOutputWithPast
    attention_class = GateSWAAttention

    def __init__(self, config):
        super().__init__(config)
        _use_gateswa_attention(self.layers, config, self.attention_class)
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, use_cache=None, **kwargs):
        return _forward_by_layer_type(self, self.output_class, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, **kwargs)


class _GateSWABody:
    """A causal LM of the base family whose stock body is replaced by ``body_class`` (the weights
    come from the checkpoint). Goes first among the bases."""

    body_class = None

    def __init__(self, config):
        super().__init__(config)
        self.model = self.body_class(config)
        self.post_init()


class GateSWAMoeModel(_OneMaskPerLayerType, Qwen3MoeModel):
    """Qwen3-MoE base."""

    config_class = GateSWAMoeConfig
    output_class = MoeModelOutputWithPast


class GateSWAMoeForCausalLM(_GateSWABody, Qwen3MoeForCausalLM):
    config_class = GateSWAMoeConfig
    body_class = GateSWAMoeModel


class GateSWALlamaModel(_OneMaskPerLayerType, LlamaModel):
    """Llama base (no q/k-norm)."""

    config_class = GateSWALlamaConfig
    attention_class = GateSWALlamaAttention


class GateSWALlamaForCausalLM(_GateSWABody, LlamaForCausalLM):
    config_class = GateSWALlamaConfig
    body_class = GateSWALlamaModel
