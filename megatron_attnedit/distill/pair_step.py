"""What both distillation stages share around their forward step over a co-located pair.

``PairStep`` is the start of every micro-batch (the one-time check of the shared weights, the
batch, the pipeline input); ``PairObjective`` builds the pair and hands the loop's calls to the
stage's step. The stages themselves (``stage1``, ``stage2``) differ in everything after that.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_attnedit.distill.colocate import Colocated, _unwrap, build_pair
from megatron_attnedit.training.objective import Objective


class PairStep:
    """A megatron ``forward_step`` over a co-located pair: ``pair``, its unwrapped ``teacher`` and
    ``student``; subclasses call ``begin`` first thing in ``forward_step``."""

    def __init__(self, pair: Colocated):
        self.pair = pair
        self.teacher, self.student = _unwrap(pair.teacher), _unwrap(pair.student)
        self._checked = False

    def begin(self, data_iterator) -> Tuple[dict, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(batch, tokens, position_ids, the pipeline input -- None on the first stage)."""
        if not self._checked:  # checkpoints are loaded after build(), before the first step
            self.pair.check_shared_unchanged()
            self._checked = True
        batch = next(data_iterator)
        input_tensor = self.student.decoder.input_tensor  # set by the schedule
        return batch, batch["tokens"], batch["position_ids"], input_tensor


class PairObjective(Objective):
    """An objective whose step is a ``PairStep`` built on ``build_pair``."""

    def build_pair_step(self, cfg, plat, trainable: str, make_step: Callable[[Colocated], PairStep]) -> List[torch.nn.Module]:
        self.pair = build_pair(cfg, plat, trainable=trainable)
        self.stage = make_step(self.pair)
        self.teacher = self.pair.teacher
        return [self.pair.student]

    def forward_step(self, data_iterator, model):
        return self.stage.forward_step(data_iterator, model)

    def step_metrics(self) -> Dict[str, torch.Tensor]:
        return self.stage.step_metrics()
