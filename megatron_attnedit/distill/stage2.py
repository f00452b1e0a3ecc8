"""Stage 2: model-level distillation on the teacher's next-token distributions.

Per micro-batch the teacher (no grad) and then the student run end to end on the same tokens:

    loss = kl_weight * T^2 KL(teacher_T || student_T)        (or its top-k variant, topk > 0)
         + feature_weight * mean over feature_layers of (1 - cos(h_student, h_teacher))
         + ce_weight * CE(student, data labels)

KL, top-k KL and CE are vocab-parallel (``losses``): the vocabulary is never gathered under TP.
``trainable: attention`` (default) trains the target's attention only, the rest stays shared with
the teacher; ``trainable: all`` gives the student its own copy of every weight and trains them all.
Stage 2 starts from stage 1's checkpoints through the loop (``checkpoint.pretrained_checkpoint``).

Pipeline parallelism: both models run through megatron's 1F1B schedule in the same forward step.
Each stage sends one tensor, the teacher's and the student's hidden states concatenated along the
batch dimension ``[s, 2b, h]`` (teacher first); the receiving stage splits it, feeds the teacher
half (detached) to the teacher and the student half to the student, so the student's gradient
flows back through the schedule as usual. The doubled batch dimension is announced to the
schedule with ``config.variable_seq_lengths`` (megatron then exchanges shapes before each
transfer: three integers). Feature-matching terms of earlier stages reach the schedule's backward
through ``pipeline.carry`` (the teacher half's element 0 carries their gradient).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core import parallel_state

from megatron_attnedit.distill import pipeline
from megatron_attnedit.distill.colocate import TRAINABLE_SETS, Colocated
from megatron_attnedit.distill.pair_step import PairObjective, PairStep
from megatron_attnedit.errors import ConfigError
from megatron_attnedit.models import layers
from megatron_attnedit.training import losses
from megatron_attnedit.training.objective import check_loss_chunk_tokens, check_options

DEFAULTS: Dict[str, object] = {
    "trainable": "attention",  # attention | all
    "temperature": 1.0,  # softmax temperature T of the KL (the loss is scaled by T^2)
    "topk": 0,  # > 0: KL on the teacher's top-k ids only (renormalised), vocab-parallel
    "kl_weight": 1.0,
    "feature_layers": [],  # global layer indices (negative from the end) for feature matching
    "feature_weight": 0.05,  # lambda of the weak feature term lambda * (1 - cos)
    "ce_weight": 0.0,  # weight of next-token CE on the data labels (0 = off)
    # tokens per chunk of the vocabulary-sized loss work (KL, top-k KL, CE): null = automatic
    # (losses.CHUNK_BYTES of fp32 per [chunk, V/tp] buffer, ~440 tokens at V=151,936, TP=1);
    # 0 = the whole micro-batch at once. Values do not depend on it; memory does (losses docstring).
    "loss_chunk_tokens": None,
}


class _SBHGrad(torch.autograd.Function):
    """Identity whose backward lays the [b, s, V] logits gradient out as a contiguous [s, b, V].

    GPTModel returns ``logits.transpose(0, 1)``; the gradient reaching the output layer is then a
    transposed view. A trainable output layer copies it to a contiguous 2-D matrix first, but the
    frozen (shared) one (megatron's LinearWithFrozenWeight) multiplies the strided 3-D view as is,
    which torch.matmul sends to a batched GEMM that runs at ~1/200 of peak (measured: 1.56 s per micro-batch at
    Qwen3-8B shape, seq 4096, on an H100, against ~4 ms for the contiguous product).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        b, s, v = grad.shape
        if grad.transpose(0, 1).stride() == (b * v, v, 1):
            return grad  # already laid out so (the chunked losses write their gradient this way)
        # A fresh [s, b, V] buffer: .contiguous() alone keeps the stride s*V of a size-1 batch
        # dimension, and that stride alone sends torch.matmul to the batched kernel.
        out = torch.empty((s, b, v), dtype=grad.dtype, device=grad.device)
        out.copy_(grad.transpose(0, 1))
        return out.transpose(0, 1)


def _grad_in_sbh_layout(logits: torch.Tensor) -> torch.Tensor:
    return _SBHGrad.apply(logits) if logits.requires_grad and logits.dim() == 3 else logits


def check_stage2_options(options: Dict[str, object]) -> Dict[str, object]:
    o = check_options(options, DEFAULTS, "stage2")
    if o["trainable"] not in TRAINABLE_SETS:
        raise ConfigError(f"objective.options.trainable={o['trainable']!r} is not one of {', '.join(TRAINABLE_SETS)}")
    if not float(o["temperature"]) > 0:
        raise ConfigError(f"objective.options.temperature must be > 0, got {o['temperature']}")
    if int(o["topk"]) < 0:
        raise ConfigError(f"objective.options.topk must be >= 0 (0 = full KL), got {o['topk']}")
    if not isinstance(o["feature_layers"], (list, tuple)):
        raise ConfigError(f"objective.options.feature_layers must be a list of layer indices, got {o['feature_layers']!r}")
    for k in ("kl_weight", "feature_weight", "ce_weight"):
        if float(o[k]) < 0:
            raise ConfigError(f"objective.options.{k} must be >= 0, got {o[k]}")
    check_loss_chunk_tokens(o["loss_chunk_tokens"])
    return o


class _LayerOutputs:
    """Forward hooks keeping the output hidden state of chosen (local) layers of one model."""

    def __init__(self, model, local_layers: List[int]):
        self.out: Dict[int, torch.Tensor] = {}
        layer_list = layers.local_layers(model)
        self.handles = [layer_list[i].register_forward_hook(self._hook(i)) for i in local_layers]

    def _hook(self, i):
        def hook(module, args, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def take(self) -> Dict[int, torch.Tensor]:
        out, self.out = self.out, {}
        return out


class Stage2(PairStep):
    """Stage-2 forward step over a co-located pair; megatron ``forward_step`` signature."""

    def __init__(self, pair: Colocated, trainable="attention", temperature=1.0, topk=0, kl_weight=1.0,
                 feature_layers=(), feature_weight=0.05, ce_weight=0.0, loss_chunk_tokens=None):
        super().__init__(pair)
        cfg = self.student.config
        self.temperature, self.topk = float(temperature), int(topk)
        self.kl_weight, self.feature_weight, self.ce_weight = float(kl_weight), float(feature_weight), float(ce_weight)
        self.chunk_tokens = loss_chunk_tokens
        n = cfg.num_layers
        chosen = sorted({(i + n) if i < 0 else i for i in feature_layers})
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise ConfigError(f"objective.options.feature_layers has {bad} outside the model's {n} layers")
        self.num_feature_layers = len(chosen) if self.feature_weight > 0 else 0
        from megatron.core.transformer.transformer_layer import (
            get_transformer_layer_offset,
        )

        off, n_local = get_transformer_layer_offset(cfg), len(layers.local_layers(self.student))
        local = [i - off for i in chosen if off <= i < off + n_local] if self.num_feature_layers else []
        self.t_hooks = _LayerOutputs(self.teacher, local)
        self.s_hooks = _LayerOutputs(self.student, local)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.sp_group = self.tp_group if cfg.sequence_parallel else None
        self.vocab_size = getattr(pair, "vocab_size", None)
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        if self.pp > 1:
            cfg.variable_seq_lengths = True  # the pipeline tensor is [s, 2b, h] (teacher + student)
        self.device = next(self.teacher.parameters()).device
        self._reset_sums()

    def _reset_sums(self) -> None:
        self._sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ("kl", "feature", "ce")}
        self._micro_batches = 0

    def forward_step(self, data_iterator, model):
        batch, tokens, position_ids, input_tensor = self.begin(data_iterator)
        t_in = s_in = None
        if input_tensor is not None:
            t_in, s_in = input_tensor.chunk(2, dim=1)
        with torch.no_grad():
            self.teacher.set_input_tensor(t_in.detach() if t_in is not None else None)
            t_out = self.teacher(tokens, position_ids, None)
            self.teacher.set_input_tensor(None)
        self.student.set_input_tensor(s_in)
        s_out = _grad_in_sbh_layout(model(tokens, position_ids, None))
        t_feat, s_feat = self.t_hooks.take(), self.s_hooks.take()

        feature = torch.zeros((), device=self.device)
        for i, h_s in s_feat.items():
            feature = feature + losses.feature_cosine(h_s, t_feat[i], self.feature_weight, sp_group=self.sp_group)
        if self.num_feature_layers:
            feature = feature / self.num_feature_layers
        self._sums["feature"] += feature.detach().double()
        self._micro_batches += 1
        local = feature + pipeline.anchor(input_tensor)
        if not self.student.post_process:
            return pipeline.carry(torch.cat([t_out.detach(), s_out], dim=1), local), None

        labels, mask = batch["labels"], batch["loss_mask"]
        kl = self._kl(s_out, t_out, mask)
        loss = self.kl_weight * kl + local
        ce = None
        if self.ce_weight > 0:
            ce = losses.cross_entropy(s_out, labels, mask, self.vocab_size, self.tp_group, self.chunk_tokens)
            loss = loss + self.ce_weight * ce
        self._sums["kl"] += kl.detach().double()
        if ce is not None:
            self._sums["ce"] += ce.detach().double()

        def loss_func(output_tensor):
            return output_tensor, {}

        return loss, loss_func

    def _kl(self, s_logits, t_logits, mask):
        if self.topk > 0:
            return losses.topk_kl_divergence(s_logits, t_logits, self.topk, mask, self.temperature, self.vocab_size, self.tp_group,
                                             self.chunk_tokens)
        return losses.kl_divergence(s_logits, t_logits, mask, self.temperature, self.vocab_size, self.tp_group, self.chunk_tokens)

    def step_metrics(self) -> Dict[str, torch.Tensor]:
        """``loss`` and ``stage2/{kl,feature,ce}`` as ``[sum, count]`` pairs (summed over ranks, then
        divided); the feature term is summed over pipeline stages, the count comes from the last.
        ``loss`` replaces the loop's value from ``loss_func`` (there, under PP, the feature terms of
        earlier stages are missing)."""
        n = torch.tensor(float(self._micro_batches) if self.student.post_process else 0.0, dtype=torch.float64, device=self.device)
        s = self._sums
        total = self.kl_weight * s["kl"] + s["feature"] + self.ce_weight * s["ce"]
        out = {"loss": torch.stack([total, n]), "stage2/kl": torch.stack([s["kl"], n])}
        if self.num_feature_layers:
            out["stage2/feature"] = torch.stack([s["feature"], n])
        if self.ce_weight > 0:
            out["stage2/ce"] = torch.stack([s["ce"], n])
        self._reset_sums()
        return out


class Stage2Objective(PairObjective):
    """``objective.name: stage2``; options: see ``DEFAULTS`` in this module."""

    name = "stage2"

    def __init__(self, options):
        self.options = check_stage2_options(options)

    def build(self, cfg, plat):
        o = self.options
        if cfg.model.recompute_granularity == "full" and o["feature_layers"] and float(o["feature_weight"]) > 0:
            raise ConfigError("objective.options.feature_layers needs layer outputs with their gradient, which "
                               "model.recompute_granularity=full does not keep (it recomputes them in the backward); "
                               "use selective recompute, or feature_weight: 0")
        return self.build_pair_step(cfg, plat, o["trainable"], lambda pair: Stage2(pair, **o))
