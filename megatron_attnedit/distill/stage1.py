"""Stage 1: layer-wise, teacher-forced distillation of the new attention.

One teacher forward per micro-batch. Hooks on each teacher layer's ``self_attention`` see its input
(the hidden state after that layer's input norm -- with the TE spec, where the norm is fused into
``linear_qkv``, the raw layer input that the fused norm receives, which is what the student's
attention receives too) and its output after o_proj (plus bias, if any). Inside the hook the
student's attention of the same layer runs on the teacher's input, with gradients on, and its
normalized MSE against the teacher's output is taken right there: the teacher's output is then
dropped, and no student output ever feeds another layer, so every layer trains independently
and all of them in the same step.

    loss = (1 / L) * sum over all L layers of nmse_l

Only the new attention parameters train (``Colocated`` froze the rest and shares it with the
teacher). The student's MLP, norms, embedding and output layer are never run.

Pipeline parallelism: each stage runs the teacher's forward for its own layers, the input coming
from the previous stage through megatron's schedule exactly like an ordinary pipeline tensor (the
teacher's hidden state, ``[s, b, h]``); the student's activations never cross stages. Each stage's
layer losses are local; ``pipeline.carry`` / ``pipeline.anchor`` give them the last stage's
gradient scale through the backward pass of the schedule, and per-layer metrics of all stages
are summed over the pipeline group by ``Stage1.reduce_metrics`` after the step.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state

from megatron_attnedit.distill import losses, pipeline
from megatron_attnedit.distill.colocate import Colocated, _unwrap


def layer_metric_name(layer: int, num_layers: int) -> str:
    """``stage1/layer_07``: zero-padded so that W&B sorts the panels in layer order."""
    return f"stage1/layer_{layer:0{max(2, len(str(num_layers - 1)))}d}"


def attention_forward(layer, hidden: torch.Tensor, rotary_pos_emb) -> torch.Tensor:
    """[s, b, h] post-o_proj output of ``layer``'s attention on normed ``hidden`` (targets' helper)."""
    try:
        from megatron_attnedit.attention.targets import attention_forward as target_attention_forward
    except ImportError:  # the targets module is not there yet: plain megatron attention call
        target_attention_forward = None
    if target_attention_forward is not None:
        return target_attention_forward(layer, hidden, rotary_pos_emb)
    out, bias = layer.self_attention(hidden, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
    return out if bias is None else out + bias


def student_rotary(student, seq_len: int):
    """The student model's rotary table for ``seq_len`` tokens, or None where attention owns its
    own (MLA) or the model has no RoPE."""
    rope = getattr(student, "rotary_pos_emb", None)
    if rope is None or getattr(student.config, "multi_latent_attention", False):
        return None
    return rope(seq_len)


class _Capture:
    """Hooks on the teacher's attention modules that train the student's attention in place."""

    def __init__(self, stage: "Stage1"):
        self.stage = stage
        self.inputs: Dict[int, torch.Tensor] = {}
        self.losses: List[Optional[torch.Tensor]] = []
        self.active = False
        self.handles = []
        for i, layer in enumerate(stage.teacher.decoder.layers):
            attn = layer.self_attention
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
            with torch.enable_grad():
                pred = attention_forward(self.stage.student.decoder.layers[i], hidden.detach(), self.stage.rotary)
                self.losses[i] = losses.normalized_mse(pred, target, sp_group=self.stage.sp_group)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class Stage1:
    """Stage-1 forward step over a co-located pair; megatron ``forward_step`` signature."""

    def __init__(self, pair: Colocated):
        self.pair = pair
        self.teacher = _unwrap(pair.teacher)
        self.student = _unwrap(pair.student)
        cfg = self.student.config
        self.num_layers = cfg.num_layers
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        self.layer_offset = get_transformer_layer_offset(cfg)
        self.sp_group = parallel_state.get_tensor_model_parallel_group() if cfg.sequence_parallel else None
        self.rotary = None
        self.device = next(self.teacher.parameters()).device
        self.capture = _Capture(self)
        self._reset_sums()

    def _reset_sums(self) -> None:
        self._layer_sums = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        self._micro_batches = 0

    def metric_names(self) -> List[str]:
        """Every layer's metric name (all stages), in layer order."""
        return [layer_metric_name(i, self.num_layers) for i in range(self.num_layers)]

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator) if data_iterator is not None else None
        input_tensor = self.student.decoder.input_tensor  # set by the schedule (None on stage 0)
        t = self.teacher
        tokens = batch["tokens"] if batch is not None else None
        seq_len = tokens.shape[1] if tokens is not None else _full_seq_len(input_tensor, self.student.config)
        self.rotary = student_rotary(self.student, seq_len)
        self.capture.losses = [None] * len(t.decoder.layers)
        self.capture.active = True
        try:
            with torch.no_grad():
                if t.pre_process:
                    hidden = t.embedding(input_ids=tokens, position_ids=batch["position_ids"])
                    t.decoder.set_input_tensor(None)
                else:
                    hidden = None
                    t.decoder.set_input_tensor(input_tensor.detach())
                rope = t.rotary_pos_emb(seq_len) if hasattr(t, "rotary_pos_emb") else None
                hidden = t.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        finally:
            self.capture.active = False
            self.capture.inputs.clear()
            t.decoder.set_input_tensor(None)
        layer_losses = self.capture.losses
        self.capture.losses = []
        if any(x is None for x in layer_losses):
            raise RuntimeError("stage 1: a teacher layer's attention did not run; check the teacher's layer specs")
        stacked = torch.stack(layer_losses)
        self._layer_sums[self.layer_offset : self.layer_offset + len(layer_losses)] += stacked.detach().double()
        self._micro_batches += 1
        local = stacked.sum() / self.num_layers + pipeline.anchor(input_tensor)
        if not self.student.post_process:
            return pipeline.carry(hidden, local), None

        def loss_func(output_tensor):
            # This stage's share of the loss; the whole-model value is stage1/loss in step_metrics().
            return output_tensor, {}

        return local, loss_func

    def step_metrics(self) -> Dict[str, torch.Tensor]:
        """Per-layer losses of every stage and their mean (``stage1/loss``), as ``[sum, count]``
        pairs: summed over ranks then divided, they are averages over micro-batches and
        data-parallel ranks whatever the pipeline layout. Every rank returns every name."""
        n = float(self._micro_batches)
        owned = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        owned[self.layer_offset : self.layer_offset + len(self.teacher.decoder.layers)] = n
        out = {name: torch.stack([self._layer_sums[i], owned[i]]) for i, name in enumerate(self.metric_names())}
        # the mean over layers: every stage adds its layers' sums, one stage (the last) the count
        total = self._layer_sums.sum() / self.num_layers
        out["stage1/loss"] = torch.stack([total, torch.tensor(n if self.student.post_process else 0.0, dtype=torch.float64, device=self.device)])
        self._reset_sums()
        return out


def _full_seq_len(input_tensor: torch.Tensor, config) -> int:
    s = input_tensor.shape[0]
    if config.sequence_parallel:
        s *= parallel_state.get_tensor_model_parallel_world_size()
    return s


# ----------------------------------------------------------------------------------------------
# The objective plugged into the training loop
# ----------------------------------------------------------------------------------------------

from megatron_attnedit.training.objective import Objective, check_options  # noqa: E402


class Stage1Objective(Objective):
    """``objective.name: stage1``. The teacher is ``model`` (hf_dir), the student ``target``; only
    the target's attention parameters train. No options."""

    name = "stage1"
    DEFAULTS: Dict[str, object] = {}

    def __init__(self, options):
        self.options = check_options(options, self.DEFAULTS, self.name)

    def build(self, cfg, plat):
        from megatron_attnedit.distill.colocate import build_pair

        self.pair = build_pair(cfg, plat, trainable="attention")
        self.stage = Stage1(self.pair)
        self.teacher = self.pair.teacher
        return [self.pair.student]

    def forward_step(self, data_iterator, model):
        return self.stage.forward_step(data_iterator, model)

    def step_metrics(self):
        return self.stage.step_metrics()
