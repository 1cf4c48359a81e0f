"""BKD: cross-entropy plus a binary cross-entropy of every student logit against the teacher's probability."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pat_hf.distillers.base import Distiller, register_distiller


def bkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the student's logits against softmax(teacher), averaged over batch and classes."""
    return F.binary_cross_entropy_with_logits(student_logits, teacher_logits.softmax(dim=-1))


@register_distiller("bkd")
class BKD(Distiller):
    def forward_train(self, images: torch.Tensor, labels: torch.Tensor,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        return logits, {
            "loss_gt": self.gt_loss(logits, labels),
            "loss_kd": self.common.kd_loss_weight * bkd_loss(logits, teacher_logits),
        }
