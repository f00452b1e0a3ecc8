"""The model builder: an HF config -> megatron TransformerConfig + layer specs + model (HybridModel
on megatron-core >= 0.19, models/hybrid.py; GPTModel before).

Family-neutral: the HF ``config.json`` is the single description of the model, and what differs
between families (q/k-norm, routed experts, RoPE scaling) is read from its ``families.Family``.
Layer specs are built fresh per layer from a per-layer description (attention kind, dense or MoE
MLP) and sliced per pipeline stage, so attention targets can swap the attention of any layer
without touching a shared spec.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules, get_transformer_layer_offset

from megatron_attnedit import compat, platform
from megatron_attnedit.attention.core import FlashCoreAttention
from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families import check_hf_config, family_of, head_dim, rope_inv_freq, rope_theta, rope_type
from megatron_attnedit.families.table import padded_vocab_size
from megatron_attnedit.models.experts import GroupedExperts

@dataclasses.dataclass
class BuildOptions:
    """How to build (not what): precision, parallel layout, implementation choices."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    sequence_parallel: bool = False
    spec: str = "local"  # local | te
    moe_dispatcher: str = "allgather"  # allgather (CPU-safe) | alltoall (GPU)
    grouped_gemm: bool = False  # models/experts.py GroupedExperts (torch._grouped_mm on GPU); SequentialMLP otherwise
    gradient_accumulation_fusion: bool = False  # weight gradients accumulated in the GEMM (kernels/wgrad.py)
    kernel_fusion: bool = False  # compiled RoPE / MLA assembly / SwiGLU (kernels/fusions.py, megatron's bias_activation_fusion)
    use_cpu_initialization: bool = True
    perform_initialization: bool = True
    recompute_granularity: Optional[str] = None
    recompute_modules: Optional[List[str]] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    extra: Dict[str, object] = dataclasses.field(default_factory=dict)  # raw TransformerConfig fields


def check_parallel(cfg: dict, tp: int, pp: int, ep: int) -> None:
    """The divisibility rules of the layout, as one clear line each."""
    kv = cfg["num_key_value_heads"]
    if tp < 1 or pp < 1 or ep < 1:
        raise ConfigError("parallel sizes must be >= 1")
    if kv % tp != 0:
        raise ConfigError(f"TP={tp} does not divide num_key_value_heads={kv}; TP splits whole query groups, choose a divisor of {kv}")
    if cfg["num_attention_heads"] % tp != 0:
        raise ConfigError(f"TP={tp} does not divide num_attention_heads={cfg['num_attention_heads']}")
    if cfg["num_hidden_layers"] % pp != 0:
        raise ConfigError(f"PP={pp} does not divide num_hidden_layers={cfg['num_hidden_layers']}; choose a divisor")
    if ep > 1:
        ne = family_of(cfg).num_experts(cfg)
        if ne == 0:
            raise ConfigError(f"EP={ep} asked for a dense model; expert parallelism needs routed experts (e.g. qwen3_moe)")
        if ne % ep != 0:
            raise ConfigError(f"EP={ep} does not divide num_experts={ne}; choose a divisor")
    if cfg["vocab_size"] % tp != 0:
        pass  # megatron pads the vocabulary itself; the converter handles the padding


def transformer_config(cfg: dict, opts: BuildOptions, config_class=TransformerConfig, **overrides) -> TransformerConfig:
    """megatron TransformerConfig for an HF config of a supported family."""
    family = family_of(cfg)
    check_hf_config(cfg)
    check_parallel(cfg, opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, opts.expert_model_parallel_size)
    kw = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_key_value_heads"],
        kv_channels=head_dim(cfg),
        ffn_hidden_size=cfg["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        qk_layernorm=family.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(cfg.get("attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        bias_activation_fusion=opts.kernel_fusion,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=opts.gradient_accumulation_fusion,
        persist_layer_norm=False,
        tensor_model_parallel_size=opts.tensor_model_parallel_size,
        pipeline_model_parallel_size=opts.pipeline_model_parallel_size,
        expert_model_parallel_size=opts.expert_model_parallel_size,
        sequence_parallel=opts.sequence_parallel and opts.tensor_model_parallel_size > 1,
        params_dtype=opts.params_dtype,
        bf16=opts.bf16,
        pipeline_dtype=opts.params_dtype,
        use_cpu_initialization=opts.use_cpu_initialization,
        perform_initialization=opts.perform_initialization,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
    )
    if opts.recompute_granularity:
        kw["recompute_granularity"] = opts.recompute_granularity
        if opts.recompute_modules:
            kw["recompute_modules"] = list(opts.recompute_modules)
        if opts.recompute_granularity == "full":
            kw["recompute_method"] = opts.recompute_method or "uniform"
            kw["recompute_num_layers"] = opts.recompute_num_layers or 1
    pattern = family.moe_layer_pattern(cfg)
    if any(pattern):
        kw.update(
            num_moe_experts=family.num_experts(cfg),
            moe_router_topk=int(cfg["num_experts_per_tok"]),
            moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
            moe_layer_freq=pattern,
            # HF: softmax over all experts, top-k, then renormalise iff norm_topk_prob. megatron's
            # default (top-k on logits, softmax over the k) is exactly the renormalised case.
            moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type=opts.moe_dispatcher,
            moe_router_dtype="fp32",
        )
    kw.update(opts.extra)
    kw.update(overrides)
    return config_class(**kw)


# --------------------------------------------------------------------------------------------
# Layer specs
# --------------------------------------------------------------------------------------------


class LocalRMSNorm(torch.nn.RMSNorm):
    """The local spec's RMSNorm: what megatron's ``WrappedTorchNorm`` builds (a ``torch.nn.RMSNorm``,
    same parameter and state-dict names), also under sequence parallelism, which WrappedTorchNorm
    refuses. A norm works on any token shard; what sequence parallelism adds is that each TP rank's
    weight gradient comes from its own tokens (or, for the per-head q/k norms, its own heads), so the
    weight carries ``sequence_parallel`` and megatron's ``finalize_model_grads`` sums it over the TP
    group, as it does for transformer-engine's norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ConfigError("the local spec's norm is a plain RMSNorm (no LayerNorm, zero-centred gamma or memory-efficient variant); use transformer_impl=transformer_engine")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def gqa_attention_spec(opts: BuildOptions, cfg: dict) -> ModuleSpec:
    """The teacher's attention: fused QKV, the family's per-head q/k RMSNorm if it has one, our
    flash core attention."""
    has_qk_norm = family_of(cfg).qk_norm
    if opts.spec == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=has_qk_norm).submodules.self_attention
    backend = LocalSpecProvider()
    qk_norm = LocalRMSNorm if has_qk_norm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=FlashCoreAttention,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def mlp_spec(opts: BuildOptions, moe: bool) -> ModuleSpec:
    if opts.spec == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=1 if moe else None, moe_grouped_gemm=moe).submodules.mlp
    spec = get_mlp_module_spec_for_backend(LocalSpecProvider(), num_experts=1 if moe else None)
    if moe and opts.grouped_gemm:
        # Stacked experts, torch._grouped_mm on GPU; checkpoints and state-dict names as SequentialMLP's.
        compat.mlp_submodules(spec).experts = ModuleSpec(module=GroupedExperts)
    return spec


def borrowed(module: torch.nn.Module) -> type:
    """A spec entry that builds to ``module`` itself, not to a new module.

    megatron's ``build_module`` instantiates the class a spec names; this class's ``__new__`` hands
    back the existing module, so a student layer can be built around its teacher's MLP without ever
    allocating (and initialising) a second copy of it. A bare class, not a ModuleSpec, so that
    TransformerLayer passes no MLP-type-specific arguments (and logs no unknown-type warning)."""

    def __new__(cls, *args, **kwargs):
        return module

    return type(f"Borrowed{type(module).__name__}", (), {"__new__": __new__, "__doc__": "the module " + repr(type(module))})


def norm_keys_map(opts: BuildOptions) -> Dict[str, str]:
    """Checkpoint keys follow the TE layout whatever the spec, as Megatron-LM does."""
    if opts.spec != "local":
        return {}
    return {"input_layernorm.": "self_attention.linear_qkv.layer_norm_", "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def layer_norm(opts: BuildOptions, moe: bool = False):
    """(input norm, pre-MLP norm) of a layer: the TE spec folds them into linear_qkv / linear_fc1
    (not into an MoE's router)."""
    norm = LocalRMSNorm if opts.spec == "local" else IdentityOp
    return norm, norm if (opts.spec == "local" or moe) else IdentityOp


def layer_spec(attention: ModuleSpec, mlp, opts: BuildOptions, moe: bool) -> ModuleSpec:
    """One transformer layer; ``mlp`` is a ModuleSpec or a ``borrowed`` module."""
    input_norm, mlp_norm = layer_norm(opts, moe)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=norm_keys_map(opts),
        ),
    )


AttentionSpecFn = Callable[[int], ModuleSpec]  # global 0-based layer index -> attention spec


def layer_parts(
    cfg: dict,
    opts: BuildOptions,
    attention_for_layer: Optional[AttentionSpecFn] = None,
    borrow_mlp: Optional[Dict[int, torch.nn.Module]] = None,
) -> List[Tuple[ModuleSpec, object, bool]]:
    """Per layer of the whole model, fresh: (attention spec, MLP spec or ``borrowed`` module, MoE?).
    ``borrow_mlp``: {global layer index: an existing MLP/MoE module} that those layers take as
    their own (see ``borrowed``)."""
    attention_for_layer = attention_for_layer or (lambda i: gqa_attention_spec(opts, cfg))
    borrow_mlp = borrow_mlp or {}
    parts = []
    for i, moe in enumerate(family_of(cfg).moe_layer_pattern(cfg)):
        mlp = borrowed(borrow_mlp[i]) if i in borrow_mlp else mlp_spec(opts, bool(moe))
        parts.append((attention_for_layer(i), mlp, bool(moe)))
    return parts


def block_spec(
    cfg: dict,
    config: TransformerConfig,
    opts: BuildOptions,
    attention_for_layer: Optional[AttentionSpecFn] = None,
    pp_rank: Optional[int] = None,
    borrow_mlp: Optional[Dict[int, torch.nn.Module]] = None,
) -> TransformerBlockSubmodules:
    """GPTModel's layer specs for this pipeline stage (``layer_parts``)."""
    specs = [layer_spec(a, mlp, opts, moe) for a, mlp, moe in layer_parts(cfg, opts, attention_for_layer, borrow_mlp)]
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    n_local = len(specs) // config.pipeline_model_parallel_size
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + n_local], layer_norm=LocalRMSNorm)


def _is_mla(attention: ModuleSpec) -> bool:
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    module = getattr(attention, "module", attention)
    return isinstance(module, type) and issubclass(module, MultiLatentAttention)


def _hybrid_model(cfg, config, opts, attention_for_layer, borrow_mlp, stages: int, **model_kwargs):
    """The HybridModel of ``layer_parts`` (megatron-core >= 0.19; see models/hybrid.py)."""
    from megatron_attnedit.models import hybrid

    parts = layer_parts(cfg, opts, attention_for_layer, borrow_mlp)
    # megatron refuses "*" beside "+": a model with any MLA layer writes "+" for all (models/hybrid.py)
    symbol = "+" if config.multi_latent_attention or any(_is_mla(a) for a, _, _ in parts) else "*"
    keys = norm_keys_map(opts)
    layers = []
    for attention, mlp, moe in parts:
        input_norm, mlp_norm = layer_norm(opts, moe)
        layers.append((symbol, hybrid.attention_layer_spec(attention, input_norm, keys), hybrid.mlp_layer_spec(mlp, mlp_norm, keys, moe), moe))
    return hybrid.build(config, layers, stages, final_norm=LocalRMSNorm, **model_kwargs)


def build_model(
    cfg: dict,
    opts: BuildOptions,
    config: Optional[TransformerConfig] = None,
    attention_for_layer: Optional[AttentionSpecFn] = None,
    borrow_mlp: Optional[Dict[int, torch.nn.Module]] = None,
    meta_vocab: Optional[int] = None,
):
    """This rank's model (its pipeline stage and TP/EP shard) on the current device: a HybridModel
    on megatron-core >= 0.19 (``compat.HYBRID_MODEL``), a GPTModel before; same computation and
    checkpoint keys. ``borrow_mlp`` as in ``layer_parts``. ``meta_vocab``: instead, the whole model
    (every layer, one stage) on the meta device with this padded vocabulary -- the converters'
    layout (names, shapes, checkpoint keys) at no memory."""
    config = config or transformer_config(cfg, opts)
    meta = meta_vocab is not None
    model_kwargs = dict(
        vocab_size=meta_vocab if meta else padded_vocab_size(cfg["vocab_size"], opts.tensor_model_parallel_size),
        max_sequence_length=int(cfg.get("max_position_embeddings", 4096)),
        pre_process=meta or parallel_state.is_pipeline_first_stage(),
        post_process=meta or parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(rope_theta(cfg)),
    )

    def make():
        if compat.HYBRID_MODEL:
            stages = 1 if meta else config.pipeline_model_parallel_size
            return _hybrid_model(cfg, config, opts, attention_for_layer, borrow_mlp, stages, **model_kwargs)
        spec = block_spec(cfg, config, opts, attention_for_layer, pp_rank=0 if meta else None, borrow_mlp=borrow_mlp)
        return GPTModel(config=config, transformer_layer_spec=spec, **model_kwargs)

    if meta:
        with torch.device("meta"):
            model = make()
        if getattr(model, "rotary_pos_emb", None) is not None:
            scale_rope(model.rotary_pos_emb, cfg)
        return model
    model = make()
    if getattr(model, "rotary_pos_emb", None) is not None:
        scale_rope(model.rotary_pos_emb, cfg)
    # megatron's local norms (WrappedTorchNorm -> torch.nn.RMSNorm) are created in fp32 whatever
    # params_dtype says; a bf16 input with an fp32 weight cannot take torch's fused rms_norm kernel.
    for m in model.modules():
        if isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            m.to(opts.params_dtype)
    if opts.recompute_granularity == "full":
        model.decoder.register_forward_pre_hook(_decoder_input_needs_grad, with_kwargs=True)
    return model.to(platform.active().device)


def scale_rope(rotary: torch.nn.Module, cfg: dict, base: Optional[float] = None) -> None:
    """A megatron ``RotaryEmbedding`` of a config with RoPE scaling (Llama 3's ``llama3``) takes the
    family's scaled inverse frequencies; megatron's own llama3 scaling fixes three of its four
    parameters (factor only). Plain RoPE keeps megatron's frequencies untouched."""
    if rope_type(cfg) != "default":
        rotary.inv_freq = rope_inv_freq(cfg, rotary.inv_freq.numel() * 2, base).to(rotary.inv_freq.device)


def _decoder_input_needs_grad(module, args, kwargs):
    """Full recompute runs layers inside megatron's reentrant CheckpointFunction, whose output needs a
    gradient only if one of its tensor inputs does (the layer weights are not inputs). With a frozen
    embedding -- distillation's student, whose embedding is the teacher's -- no layer would get a
    gradient at all; a decoder input that asks for one (its gradient goes nowhere) restores them.
    (Later pipeline stages receive their input with requires_grad already.)"""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not (torch.is_tensor(x) and torch.is_grad_enabled() and module.training and not x.requires_grad):
        return None
    x = x.detach().requires_grad_()
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs
