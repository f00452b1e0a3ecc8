"""Stage 1: layer-wise, teacher-forced distillation of the new attention.

One teacher forward per micro-batch. Hooks on each teacher layer's ``self_attention`` see its input
(the hidden state after that layer's input norm -- with the TE spec, where the norm is fused into
``linear_qkv``, the raw layer input that the fused norm receives, which is what the student's
attention receives too) and its output after o_proj (plus bias, if any). Inside the hook the
student's attention of the same layer runs on the teacher's input, with gradients on, and its
normalized MSE against the teacher's output is taken right there: the teacher's output is dropped
at once, and no student output ever feeds another layer, so every layer trains independently and
all of them in the same step.

    loss = (1 / L) * sum over the L trained layers of nmse_l

Only the new attention parameters train (``Colocated`` froze the rest and shares it with the
teacher); layers whose attention the target keeps frozen (e.g. the ``G`` layers of an MLA pattern)
are skipped. The student's MLP, norms, embedding and output layer never run.

Pipeline parallelism: each stage runs the teacher's forward for its own layers, the input coming
from the previous stage through megatron's schedule as an ordinary pipeline tensor (the teacher's
hidden state, ``[s, b, h]``); the student's activations never cross stages. Each stage's layer
losses are local; ``pipeline.carry`` / ``pipeline.anchor`` give them the last stage's gradient
scale through the schedule's backward, and ``step_metrics`` reports every stage's layers.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_attnedit.distill import pipeline
from megatron_attnedit.distill.colocate import Colocated
from megatron_attnedit.distill.pair_step import PairObjective, PairStep
from megatron_attnedit.models import layers
from megatron_attnedit.training import losses
from megatron_attnedit.training.objective import check_options


def layer_metric_name(layer: int, num_layers: int) -> str:
    """``stage1/layer_07``: zero-padded so that W&B sorts the panels in layer order."""
    return f"stage1/layer_{layer:0{max(2, len(str(num_layers - 1)))}d}"


class _Capture:
    """Hooks on the teacher's attention modules that run and score the student's attention."""

    def __init__(self, stage: "Stage1"):
        self.stage = stage
        self.inputs: Dict[int, torch.Tensor] = {}
        self.losses: Dict[int, torch.Tensor] = {}
        self.active = False
        self.handles = []
        t_layers, self.s_layers = layers.local_layers(stage.teacher), layers.local_layers(stage.student)
        for i in stage.trained_local:
            attn = t_layers[i].self_attention
            self.handles.append(attn.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(module, args, kwargs):
            if self.active:
                self.inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _post(self, i):
        def hook(module, args, output):
            if not self.active:
                return
            hidden = self.inputs.pop(i)
            out, bias = output
            target = out if bias is None else out + bias
            with torch.set_grad_enabled(self.stage.training):
                pred = layers.attention_forward(self.s_layers[i], hidden.detach(), self.stage.rotary)
                self.losses[i] = losses.normalized_mse(pred, target, sp_group=self.stage.sp_group)

        return hook


class Stage1(PairStep):
    """Stage-1 forward step over a co-located pair; megatron ``forward_step`` signature."""

    def __init__(self, pair: Colocated):
        super().__init__(pair)
        cfg = self.student.config
        self.device = next(self.teacher.parameters()).device
        from megatron.core.transformer.transformer_layer import (
            get_transformer_layer_offset,
        )

        self.layer_offset = get_transformer_layer_offset(cfg)
        self.sp_group = parallel_state.get_tensor_model_parallel_group() if cfg.sequence_parallel else None
        # which layers train: local ones from requires_grad, all stages' through the pipeline group
        self.trained_local = [i for i, l in enumerate(layers.local_layers(self.student)) if any(p.requires_grad for p in l.self_attention.parameters())]
        mask = torch.zeros(cfg.num_layers, device=self.device)
        mask[[self.layer_offset + i for i in self.trained_local]] = 1.0
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(mask, group=parallel_state.get_pipeline_model_parallel_group())
        self.trained_global = [int(i) for i in mask.nonzero().flatten().tolist()]
        self.num_trained = len(self.trained_global)
        self.num_layers = cfg.num_layers
        self.rotary = None
        self.training = True
        self.capture = _Capture(self)
        self._reset_sums()

    def _reset_sums(self) -> None:
        self._layer_sums = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        self._micro_batches = 0

    def forward_step(self, data_iterator, model):
        _, tokens, position_ids, input_tensor = self.begin(data_iterator)
        t = self.teacher
        seq_len = tokens.shape[1]
        self.rotary = layers.rotary_pos_emb_for(self.student, seq_len)
        self.training = torch.is_grad_enabled()  # False in the loop's evaluation (forward only)
        self.capture.losses = {}
        self.capture.active = True
        try:
            with torch.no_grad():
                if t.pre_process:
                    hidden = t.embedding(input_ids=tokens, position_ids=position_ids)
                    t.decoder.set_input_tensor(None)
                else:
                    hidden = None
                    t.decoder.set_input_tensor(input_tensor.detach())
                rope = layers.rotary_pos_emb_for(t, seq_len)
                hidden = t.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        finally:
            self.capture.active = False
            self.capture.inputs.clear()
            t.decoder.set_input_tensor(None)
        layer_losses, self.capture.losses = self.capture.losses, {}
        local = pipeline.anchor(input_tensor)
        if layer_losses:
            idx = sorted(layer_losses)
            stacked = torch.stack([layer_losses[i] for i in idx])
            self._layer_sums[[self.layer_offset + i for i in idx]] += stacked.detach().double()
            local = local + stacked.sum() / self.num_trained
        self._micro_batches += 1
        if not self.student.post_process:
            return pipeline.carry(hidden, local), None

        def loss_func(output_tensor):
            # This stage's share of the loss; the whole-model value is "loss" in step_metrics().
            return output_tensor, {}

        return local, loss_func

    def metric_names(self) -> List[str]:
        """The trained layers' metric names (all stages), in layer order."""
        return [layer_metric_name(i, self.num_layers) for i in self.trained_global]

    def step_metrics(self) -> Dict[str, torch.Tensor]:
        """Per-layer losses of every stage and their mean, as ``[sum, count]`` pairs: summed over
        ranks then divided, they are averages over micro-batches and data-parallel ranks whatever
        the pipeline layout. Every rank returns every name. ``loss`` replaces the value the loop
        took from ``loss_func``, which under PP holds only the last stage's layers."""
        n = float(self._micro_batches)
        local = set(self.layer_offset + i for i in self.trained_local)
        out = {}
        for i in self.trained_global:
            count = torch.tensor(n if i in local else 0.0, dtype=torch.float64, device=self.device)
            out[layer_metric_name(i, self.num_layers)] = torch.stack([self._layer_sums[i], count])
        # the mean over layers: every stage adds its layers' sums, one stage (the last) the count
        total = self._layer_sums.sum() / max(1, self.num_trained)
        last = torch.tensor(n if self.student.post_process else 0.0, dtype=torch.float64, device=self.device)
        out["loss"] = torch.stack([total, last])
        self._reset_sums()
        return out


class Stage1Objective(PairObjective):
    """``objective.name: stage1``. The teacher is ``model`` (hf_dir), the student ``target``; only
    the target's attention parameters train. No options."""

    name = "stage1"
    DEFAULTS: Dict[str, object] = {}

    def __init__(self, options):
        self.options = check_options(options, self.DEFAULTS, self.name)

    def build(self, cfg, plat):
        return self.build_pair_step(cfg, plat, "attention", Stage1)
