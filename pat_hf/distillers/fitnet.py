"""FitNet as PAT's reference rewrote it for heterogeneous pairs: CE + KD + the MSE between each selected
student stage, aligned onto the teacher stage's grid and width, and that teacher stage (docs/REFERENCE.md,
Distillers).

Both stages are seen as 2-D grids (prefix tokens dropped, tokens laid on their grid), so one aligner family
covers CNN and token models alike (`GridAligner`). The reference mishandles class tokens and asserts for
ViT teachers when a student stage is coarser than the teacher's grid (docs/REFERENCE.md, Distillers); this
runs on any two grids (pooled onto the teacher's grid first where they are not integer multiples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pat_hf.distillers.base import (
    DistillArguments,
    DistillContext,
    Distiller,
    check_stage_selection,
    register_distiller,
)
from pat_hf.modules.grid_aligner import GridAligner
from pat_hf.modules.projectors import init_weights
from pat_hf.modules.token_grid import FeatureGrid


@dataclass
class FitNetArguments:
    fitnet_stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4],
                                     metadata={"help": "stages (1-4) whose features are matched"})
    fitnet_loss_weight: float = field(default=1.0, metadata={"help": "weight of the feature (hint) loss"})

    def __post_init__(self):
        check_stage_selection("--fitnet-stages", self.fitnet_stages)


@register_distiller("fitnet")
class FitNet(Distiller):
    supports_unlabelled = True
    reference_module_names = {"aligners": "projector"}
    Arguments = FitNetArguments
    requires_stages = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, common: DistillArguments,
                 hparams: FitNetArguments, context: DistillContext):
        super().__init__(student, teacher, common, hparams, context)
        stages = hparams.fitnet_stages
        s, t = self.student_stages, self.teacher_stages
        self.student_grids = {k: FeatureGrid.of(s.stage_shapes[k - 1], context.input_size, s.num_prefix_tokens)
                              for k in stages}
        self.teacher_grids = {k: FeatureGrid.of(t.stage_shapes[k - 1], context.input_size, t.num_prefix_tokens)
                              for k in stages}
        self.aligners = nn.ModuleDict({str(k): self._aligner(k) for k in stages})
        init_weights(self.aligners)

    def _aligner(self, stage: int) -> GridAligner:
        s, t = self.student_grids[stage], self.teacher_grids[stage]
        # The reference's CNN->CNN aligner has no bias; its aligners involving tokens do.
        return GridAligner(s.channels, s.size, t.channels, t.size, bias=s.is_sequence or t.is_sequence)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = self.student_stages(images)
        teacher = self.teacher_features(images)
        hint = sum(F.mse_loss(self.aligners[str(k)](self.student_grids[k].to_map(student.stages[k - 1])),
                              self.teacher_grids[k].to_map(teacher.stages[k - 1]))
                   for k in self.hparams.fitnet_stages)
        return student.logits, {
            "loss_gt": self.gt_loss(student.logits, labels, labelled),
            "loss_kd": self.kd_term(student.logits, teacher.logits),
            "loss_fitnet": self.hparams.fitnet_loss_weight * hint,
        }
