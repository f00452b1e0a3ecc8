"""What the loop trains: the Objective interface, the registry of objectives, and the ``lm`` objective.

The loop (training/loop.py) is one loop for every stage; an objective says what a step computes.

Interface -- a class registered in ``OBJECTIVES`` and constructed as ``cls(options)`` with the
recipe's ``objective.options`` dict (validate it with ``check_options``; unknown keys -> ConfigError):

``build(cfg, plat) -> List[MegatronModule]``
    Build the models to train on this rank (this pipeline stage's GPTModel; a list, one chunk per
    virtual stage -- we use one) on ``plat.device``, initialised. Frozen extras (the teacher) are
    kept on ``self``; they are never wrapped, optimised or checkpointed. Called after
    ``parallel_state`` is initialised and the seeds are set. Use ``hf_config``, ``build_options``,
    ``build_gpt`` and ``load_hf_weights`` below rather than re-deriving them.

``is_trainable(name, param) -> bool``  (default: ``param.requires_grad``)
    Which parameters of the built models train (``name`` as in ``named_parameters()`` of the
    chunk). The loop sets ``requires_grad`` from it before megatron's DDP wraps the model, so
    frozen parameters get no gradient buffer and no optimizer state.

``forward_step(data_iterator, model) -> (output_tensor, loss_func)``
    Exactly what megatron's ``get_forward_backward_func()`` schedules expect. Called once per
    micro-batch on every pipeline stage; ``next(data_iterator)`` gives one micro-batch on the
    device: ``{"tokens", "labels", "position_ids": LongTensor [b, s], "loss_mask": FloatTensor [b, s]}``.
    On the last stage ``loss_func(output_tensor)`` returns megatron 0.16's conventions, either
      ``(loss_sum, num_tokens, metrics)``: the schedule divides by ``num_tokens`` and by the number
          of micro-batches (per-token mean per micro-batch, averaged over micro-batches), or
      ``(loss_mean, metrics)``: the schedule divides by the number of micro-batches.
    DDP then averages gradients over data-parallel ranks. ``metrics`` maps names to detached
    tensors: a scalar (averaged over micro-batches and ranks) or ``[sum, count]`` (summed, then
    divided). The loop logs them next to ``loss`` (which it records itself from ``loss_func``'s
    first value); put per-layer values under names like ``stage1/layer_03``.

Optional:
``step_metrics() -> Dict[str, Tensor]``  metrics produced outside ``loss_func`` (e.g. every pipeline
    stage's own layer losses); called on every rank after each forward-backward, same reduction.
``forward_backward_func()``  the schedule to use (default ``get_forward_backward_func()``); replace it
    when a stage cannot use megatron's pipeline schedule, keeping its signature.
``state_dict() / load_state_dict(sd)``  extra per-rank state saved in the checkpoint (tensors, numbers,
    strings, lists, dicts: it is read back with ``torch.load(weights_only=True)``).

The loop owns DDP, the optimizer, the scheduler, checkpoints, data and monitoring.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from megatron_attnedit import families
from megatron_attnedit.config import Config
from megatron_attnedit.convert import hf_io
from megatron_attnedit.errors import ConfigError
from megatron_attnedit.families.table import ModelTable
from megatron_attnedit.kernels import wgrad
from megatron_attnedit.models import builder
from megatron_attnedit.targets.student import build_student
from megatron_attnedit.training import losses

# name -> "module:Class" (imported on use, so a missing or broken objective fails only when asked for)
OBJECTIVES: Dict[str, Union[str, Callable]] = {
    "lm": "megatron_attnedit.training.objective:LMObjective",
    "stage1": "megatron_attnedit.distill.stage1:Stage1Objective",
    "stage2": "megatron_attnedit.distill.stage2:Stage2Objective",
    "teacher_forward": "megatron_attnedit.distill.teacher_forward:TeacherForwardObjective",  # benchmark reference
}


def register(name: str, factory: Union[str, Callable]) -> None:
    """Add an objective (tests and experiments; the built-in ones are the lines above)."""
    OBJECTIVES[name] = factory


def create(name: str, options: Dict[str, Any]) -> "Objective":
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(OBJECTIVES)}"
        raise ConfigError(f"unknown objective.name {name!r}; {hint}")
    factory = OBJECTIVES[name]
    if isinstance(factory, str):
        module, cls = factory.split(":")
        try:
            factory = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"objective {name!r} ({OBJECTIVES[name]}) is not available: {e}") from None
    return factory(dict(options))


def check_options(options: Dict[str, Any], defaults: Dict[str, Any], objective: str) -> Dict[str, Any]:
    """``defaults`` updated with ``options``; an unknown option raises ConfigError naming the closest."""
    for k in options:
        if k not in defaults:
            close = difflib.get_close_matches(k, list(defaults), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(defaults) or '(none)'}"
            raise ConfigError(f"unknown option objective.options.{k} for objective {objective!r}{hint}")
    return {**defaults, **options}


def check_loss_chunk_tokens(value: Any) -> None:
    """``objective.options.loss_chunk_tokens`` (lm, stage2): null (automatic) or an integer >= 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"objective.options.loss_chunk_tokens must be null (automatic) or an integer >= 0 (0 = no chunks), got {value!r}")


class Objective:
    """Base class; see the module docstring for the contract."""

    name = "objective"

    def __init__(self, options: Dict[str, Any]):
        self.options = check_options(options, {}, self.name)

    def build(self, cfg: Config, plat) -> List[torch.nn.Module]:
        raise NotImplementedError

    def is_trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        return param.requires_grad

    def forward_step(self, data_iterator, model):
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# Helpers for objectives: the model described by the config
# ------------------------------------------------------------------------------------------------


def hf_config(cfg: Config) -> dict:
    """The HF config dict of ``cfg.model`` (hf_dir's config.json or a preset, plus overrides)."""

    hf = families.load_hf_config(cfg.model.hf_dir) if cfg.model.hf_dir else families.config_for_preset(cfg.model.preset)
    hf.update(cfg.model.overrides)
    families.check_hf_config(hf)
    return hf


def use_bf16(cfg: Config, plat) -> bool:
    return plat.name != "cpu" if cfg.training.bf16 is None else bool(cfg.training.bf16)


def gradient_accumulation_fusion(cfg: Config, plat) -> bool:
    """``model.gradient_accumulation_fusion``, None resolved: on for CUDA with the local spec where
    the fp32-accumulating GEMM runs (TE's layers fuse it themselves)."""

    m = cfg.model
    if m.gradient_accumulation_fusion is not None:
        return bool(m.gradient_accumulation_fusion)
    return plat.name == "cuda" and m.transformer_impl == "local" and wgrad.supported(plat.device)


def kernel_fusion(cfg: Config, plat) -> bool:
    """``model.kernel_fusion``, None resolved: on for CUDA with the local spec (inductor's kernels;
    TE brings its own fused RoPE and activations)."""
    m = cfg.model
    if m.kernel_fusion is not None:
        return bool(m.kernel_fusion)
    return plat.name == "cuda" and m.transformer_impl == "local"


def build_options(cfg: Config, plat) -> "builder.BuildOptions":  # noqa: F821

    p, m = cfg.parallel, cfg.model
    bf16 = use_bf16(cfg, plat)
    return builder.BuildOptions(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        sequence_parallel=p.sequence_parallel,
        spec="te" if m.transformer_impl == "transformer_engine" else "local",
        moe_dispatcher=m.moe_token_dispatcher_type,
        grouped_gemm=m.moe_grouped_gemm,
        gradient_accumulation_fusion=gradient_accumulation_fusion(cfg, plat),
        kernel_fusion=kernel_fusion(cfg, plat),
        use_cpu_initialization=m.init_on_cpu or plat.name == "cpu",
        recompute_granularity=m.recompute_granularity,
        recompute_modules=m.recompute_modules,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
    )


def build_gpt(cfg: Config, plat, hf: Optional[dict] = None, attention_for_layer=None):
    """This rank's GPTModel for ``cfg.model`` (random init; see load_hf_weights)."""

    return builder.build_model(hf or hf_config(cfg), build_options(cfg, plat), attention_for_layer=attention_for_layer)


def load_hf_weights(model, hf_dir: str, hf: dict) -> None:
    """Fill this rank's shard of ``model`` from an HF checkpoint directory."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    hf_io.load_into_model(model, hf_io.HFCheckpoint(hf_dir), ModelTable(hf, tp=tp))


# ------------------------------------------------------------------------------------------------
# lm: next-token cross entropy (pretraining the tiny teacher; the plain-CE baseline of a student)
# ------------------------------------------------------------------------------------------------


class LMObjective(Objective):
    """Plain next-token CE over the whole model, vocab-parallel under TP (no vocabulary gather).

    The model is ``cfg.model``: HF weights from ``model.hf_dir`` unless ``model.random_init``,
    random for a preset. With ``target.name`` set, the student architecture of that target is
    built instead (random attention init) -- the "plain CE step" baseline of a student.

    The CE is ``distill.losses.cross_entropy_per_token``: fp32 softmax over token chunks, padded
    vocabulary ids excluded, gradient written in the logits' dtype during the forward. Megatron's
    ``vocab_parallel_cross_entropy`` wants fp32 logits: a full fp32 copy ([s, b, V/tp], 2.5 GB at
    Qwen3 size and 4096 tokens) kept from forward to backward, plus its bf16 cast in backward.
    """

    name = "lm"
    DEFAULTS: Dict[str, Any] = {
        # tokens per chunk of the CE's vocabulary-sized work: null = automatic (losses.CHUNK_BYTES),
        # 0 = the whole micro-batch at once; the loss does not depend on it
        "loss_chunk_tokens": None,
    }

    def __init__(self, options: Dict[str, Any]):
        self.options = check_options(options, self.DEFAULTS, self.name)
        check_loss_chunk_tokens(self.options["loss_chunk_tokens"])
        self.vocab_size: Optional[int] = None

    def build(self, cfg: Config, plat) -> List[torch.nn.Module]:
        hf = hf_config(cfg)
        self.vocab_size = int(hf["vocab_size"])
        if cfg.target.name:
            return [build_student(hf, cfg.target, build_options(cfg, plat))]
        model = build_gpt(cfg, plat, hf)
        if cfg.model.hf_dir and not cfg.model.random_init:
            load_hf_weights(model, cfg.model.hf_dir, hf)
        return [model]

    def forward_step(self, data_iterator, model):
        from megatron.core import parallel_state

        batch = next(data_iterator)
        # Without labels, GPTModel returns logits [b, s, V/TP] on the last stage (hidden states elsewhere).
        output = model(batch["tokens"], batch["position_ids"], None)
        labels, mask = batch["labels"], batch["loss_mask"]
        tp_group = parallel_state.get_tensor_model_parallel_group()

        def loss_func(logits):
            ce = losses.cross_entropy_per_token(logits, labels, self.vocab_size, tp_group, self.options["loss_chunk_tokens"])
            loss_sum = (ce * mask).sum()
            num_tokens = mask.sum().to(torch.int)
            return loss_sum, num_tokens, {}  # the loop logs the loss itself

        return output, loss_func
