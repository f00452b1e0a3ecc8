"""``teacher_forward``: the teacher's forward alone, through the training loop -- the benchmark's
reference for what stage 1 and stage 2 add on top of the teacher they must run anyway.

The teacher is built and loaded exactly as for distillation (``colocate.build_teacher``; random
weights for a preset) and runs under ``no_grad`` in eval mode, as stage 1 and stage 2 run it.
``output_layer: false`` (default) runs what stage 1 runs of it: embedding and decoder, no logits;
``true`` runs the whole model to the logits, as stage 2 does.

The loop needs something to train: the teacher's smallest parameter (a norm weight) is marked
trainable and enters the loss with weight 0. Its gradient is zero, and its optimizer step, gradient
all-reduce and the loop's bookkeeping are what a step costs besides the forward (well under 1 ms
at real shapes). The logged loss is 0. Pipeline parallelism is not supported (the forward under
no_grad has nothing to send backward through the schedule).
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_attnedit.errors import ConfigError
from megatron_attnedit.distill.colocate import _unwrap, build_teacher, teacher_loader
from megatron_attnedit.models import layers
from megatron_attnedit.training.objective import Objective, build_options, check_options, hf_config


class TeacherForwardObjective(Objective):
    """``objective.name: teacher_forward``; options: ``output_layer`` (bool, default false)."""

    name = "teacher_forward"
    DEFAULTS: Dict[str, object] = {"output_layer": False}

    def __init__(self, options):
        self.options = check_options(options, self.DEFAULTS, self.name)
        if not isinstance(self.options["output_layer"], bool):
            raise ConfigError(f"objective.options.output_layer must be true or false, got {self.options['output_layer']!r}")
        self.anchor_name = None

    def build(self, cfg, plat) -> List[torch.nn.Module]:
        if cfg.parallel.pipeline_model_parallel_size != 1:
            raise ConfigError("objective teacher_forward runs with parallel.pipeline_model_parallel_size=1 only")
        hf, opts = hf_config(cfg), build_options(cfg, plat)
        self.teacher = build_teacher(hf, opts, teacher_loader(cfg, hf, opts))
        self.anchor_name = min(self.teacher.named_parameters(), key=lambda kv: kv[1].numel())[0]
        return [self.teacher]

    def is_trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        return name == self.anchor_name

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, position_ids = batch["tokens"], batch["position_ids"]
        t = _unwrap(model)
        t.eval()  # the loop puts its models in train mode; the distillation stages run the teacher in eval
        with torch.no_grad():
            if self.options["output_layer"]:
                t(tokens, position_ids, None)
            else:
                hidden = t.embedding(input_ids=tokens, position_ids=position_ids)
                t.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=layers.rotary_pos_emb_for(t, tokens.shape[1]))
        anchor = t.get_parameter(self.anchor_name)
        loss = (anchor * 0.0).sum()

        def loss_func(output_tensor):
            return output_tensor, {}

        return loss, loss_func
