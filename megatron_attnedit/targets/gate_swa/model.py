"""The GateSWA target on megatron-core: the gated attention module, its spec and initializer, auto:K.

Per layer, on top of the teacher's attention (Q/K/V/O, q/k-norm, RoPE inherited unchanged):

* sliding-window causal attention, query i sees keys i-W < j <= i ("S" layers), or full causal
  attention ("F" layers), from a pattern string tiled over the layers ("SSSSSF"), an explicit
  per-layer list, or ``auto:K`` (the K layers whose teacher attention puts the most probability
  mass beyond the window on calibration tokens are F; ``resolve_auto_pattern``);
* an output gate on the attention output, before o_proj, computed from the layer input x:
  ``o_h <- o_h * 2 sigmoid(x W_g + b_g)_h``, one value per head (``gate: head``) or per channel
  (``gate: channel``);
* optional learnable per-head sink logits (a virtual key with value zero; ``sinks: true``).

Gate init ("starts open"): W_g = 0 and b_g = 0, so the gate is 2 sigmoid(0) = 1 *exactly* and the
layer starts as the teacher's, with the steepest sigmoid slope (gradient 0.5 per unit of logit)
rather than a saturated one -- a bias of +10 would also give ~1, but with a gradient of 5e-5. The
factor 2 is a reparameterisation: 2 sigmoid(z) o W_o = sigmoid(z) o (2 W_o), so an export to a
plain sigmoid gate (Qwen3-Next, gated attention) folds it into o_proj. The gate may therefore
amplify a head up to 2x as well as close it.

megatron-core pieces used: ``window_size`` / ``window_attn_skip_freq`` (per-layer 0/1 list) reach
the core attention (FlashCoreAttention honours them), ``softmax_type="learnable"`` gives the sink
parameter, and ``attention_output_gate`` drives megatron's own gate hook in ``Attention.forward``
(ask ``get_query_key_value_tensors`` for a gate, then ``_apply_output_gate``). What megatron lacks
and ``GatedSelfAttention`` adds: a per-head option, a bias, the open start, and a gate projection
of its own (``linear_gate``) instead of rows appended to ``linear_qkv`` -- so linear_qkv keeps the
teacher's exact shape and layout (shareable with the teacher, converted by the teacher's rule).
The cost: under sequence parallelism the gate projection gathers the input once more.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import List, Union

import torch
import torch.distributed as dist
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_attnedit.config import TargetConfig
from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families.base import H, P
from megatron_attnedit.families.mapping import Rule
from megatron_attnedit.families.table import gqa_attention_rules
from megatron_attnedit.models.builder import gqa_attention_spec
from megatron_attnedit.models.forward import forward_logits
from megatron_attnedit.models.layers import global_layer_index, local_layers
from megatron_attnedit.targets.gate_swa import GateSWATarget, is_auto


@dataclasses.dataclass
class GatedSelfAttentionSubmodules(SelfAttentionSubmodules):
    linear_gate: Union[ModuleSpec, type] = None


def _zeros(w):
    return torch.nn.init.zeros_(w)


class GatedSelfAttention(SelfAttention):
    """megatron SelfAttention with a separate output-gate projection (per head or per channel)."""

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal, gate: str = "head", **kwargs):
        # kwargs: cp_comm_type, pg_collection (and from megatron-core 0.17 on name, pp_layer_offset)
        # Build Q/K/V/O exactly as the teacher's: linear_qkv must not grow gate rows.
        base = copy.copy(config)
        base.attention_output_gate = False
        super().__init__(base, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        # With the flag on, Attention.forward requests a gate and calls _apply_output_gate.
        self.config = copy.copy(config)
        self.config.attention_output_gate = True
        self.gate_width = 1 if gate == "head" else self.hidden_size_per_attention_head
        self.linear_gate = build_module(
            submodules.linear_gate,
            self.config.hidden_size,
            self.config.num_attention_heads * self.gate_width,
            config=base,
            init_method=_zeros,
            gather_output=False,
            bias=True,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="gate",
            tp_group=self.pg_collection.tp,
        )

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        qkv = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=False, split_qkv=split_qkv)
        if not output_gate:
            return qkv
        gate, _ = self.linear_gate(hidden_states)  # [s, b, local heads * width]
        return (*qkv, gate)

    def _apply_output_gate(self, x, gate):
        s, b = x.shape[0], x.shape[1]
        g = 2.0 * torch.sigmoid(gate.float()).view(s, b, -1, self.gate_width)
        out = x.float().view(s, b, g.shape[2], -1) * g
        return out.to(x.dtype).view(s, b, -1)


def attention_spec(target, layer, hf_cfg, options, build_opts):
    o = target.resolve(hf_cfg, options)
    teacher = gqa_attention_spec(build_opts, hf_cfg).submodules
    same_as_teacher = {f.name: getattr(teacher, f.name) for f in dataclasses.fields(teacher)}
    return ModuleSpec(
        module=GatedSelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "gate": o.gate},
        submodules=GatedSelfAttentionSubmodules(**same_as_teacher, linear_gate=LocalSpecProvider().column_parallel_linear()),
    )


def config_overrides(target, hf_cfg, options):
    o = target.resolve(hf_cfg, options)
    kinds = target.layer_kinds(hf_cfg, options)
    return TransformerConfig, dict(
        window_size=(o.window - 1, 0),  # (keys before the query, keys after it)
        window_attn_skip_freq=[1 if k == "S" else 0 for k in kinds],
        softmax_type="learnable" if o.sinks else "vanilla",
        attention_output_gate=True,
    )


def attention_rules(target, layer, hf_cfg, options):
    o = target.resolve(hf_cfg, options)
    rules = list(gqa_attention_rules(hf_cfg)) + [
        Rule(P + "self_attention.linear_gate.weight", (H + "self_attn.output_gate.weight",), "copy", 0),
        Rule(P + "self_attention.linear_gate.bias", (H + "self_attn.output_gate.bias",), "copy", 0),
    ]
    if o.sinks:
        rules.append(Rule(P + "self_attention.core_attention.softmax_offset", (H + "self_attn.sinks",), "copy", 0))
    return rules


@torch.no_grad()
def init_from_teacher(target, student_attn, teacher_attn, layer, hf_cfg, options, **extra):
    o = target.resolve(hf_cfg, options)
    own = dict(student_attn.named_parameters())
    for name, p in teacher_attn.named_parameters():
        own[name].copy_(p)  # Q/K/V/O and q/k-norm, unchanged
    student_attn.linear_gate.weight.zero_()
    student_attn.linear_gate.bias.zero_()  # 2 sigmoid(0) = 1: the gate starts exactly open
    sink = getattr(student_attn.core_attention, "softmax_offset", None)
    if sink is not None:
        sink.fill_(float(o.sink_init))


def validate_layout(target, hf_cfg, options, build_opts):
    if build_opts.spec != "local":
        raise ConfigError("gate_swa needs the local spec (spec: local); its gate and window live in our modules")


def trainable_attention_params(target, layer_module):
    return list(layer_module.self_attention.parameters())


# --------------------------------------------------------------------------------------------
# auto:K -- the layers that need full attention most, measured on the teacher
# --------------------------------------------------------------------------------------------


def _mass_beyond_window(q, k, scale: float, window: int):
    """(sum over queries with keys beyond the window of the causal softmax mass on those keys,
    number of such (query, head, batch) rows). q [s, b, h, d], k [s, b, hk, d]."""
    s = q.shape[0]
    if s <= window:
        return 0.0, 0
    h, hk = q.shape[2], k.shape[2]
    qq = q.permute(1, 2, 0, 3).float()
    kk = k.permute(1, 2, 0, 3).float().repeat_interleave(h // hk, dim=1)
    i = torch.arange(s, device=q.device)
    causal = i[None, :] <= i[:, None]
    beyond = i[None, :] <= i[:, None] - window
    total = 0.0
    for head in range(h):  # one head at a time: [b, s, s] scores at most
        scores = torch.matmul(qq[:, head], kk[:, head].transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        total += float((probs * beyond).sum())
    rows = (s - window) * h * q.shape[1]
    return total, rows


@torch.no_grad()
def attention_mass_beyond_window(teacher, tokens: torch.Tensor, window: int, num_layers: int) -> List[float]:
    """Per layer (global index), the teacher's mean attention probability on keys more than
    ``window`` - 1 positions back, over the queries that have such keys. Works at any TP/PP layout
    (every rank gets the full list); ``tokens`` [b, s] with s > window."""
    sums = torch.zeros(num_layers, dtype=torch.float64)
    rows = torch.zeros(num_layers, dtype=torch.float64)
    handles = []
    for layer in local_layers(teacher):
        idx = global_layer_index(layer)
        core = layer.self_attention.core_attention

        def hook(mod, args, kwargs, idx=idx):
            q, k = args[0], args[1]
            t, n = _mass_beyond_window(q, k, mod.softmax_scale, window)
            sums[idx] += t
            rows[idx] += n

        handles.append(core.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        forward_logits(teacher, tokens)
    finally:
        for hnd in handles:
            hnd.remove()
    if dist.is_initialized() and dist.get_world_size() > 1:
        # TP ranks hold different heads, PP stages different layers; DP replicas count alike.
        both = torch.stack([sums, rows])
        dist.all_reduce(both)
        sums, rows = both[0], both[1]
    return [float(s / r) if r > 0 else 0.0 for s, r in zip(sums, rows)]


def choose_full_layers(masses: List[float], k: int) -> List[str]:
    """Pattern list with F at the k layers of largest mass (ties: the earlier layer), S elsewhere."""
    order = sorted(range(len(masses)), key=lambda i: (-masses[i], i))
    full = set(order[:k])
    return ["F" if i in full else "S" for i in range(len(masses))]


def resolve_auto_pattern(teacher, tokens: torch.Tensor, target, hf_cfg: dict):
    """A TargetConfig whose ``auto:K`` pattern is replaced by the explicit per-layer list chosen on
    ``tokens`` (calibration text, [b, s] with s > window); other configs are returned unchanged.
    The explicit list is what the run directory records, so the choice is reproducible."""
    o = GateSWATarget().resolve(hf_cfg, target.options)
    pat = o.pattern
    if not is_auto(pat):
        return target
    if tokens.shape[1] <= o.window:
        raise ConfigError(f"calibration sequences of {tokens.shape[1]} tokens cannot measure mass beyond a window of {o.window}; use longer ones")
    masses = attention_mass_beyond_window(teacher, tokens, o.window, hf_cfg["num_hidden_layers"])
    options = dict(target.options)
    options["pattern"] = choose_full_layers(masses, int(pat[5:]))
    return TargetConfig(name=target.name, options=options)
