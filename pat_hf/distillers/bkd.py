"""BKD: cross-entropy plus a binary cross-entropy of every student logit against the teacher's probability."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pat_hf.distillers.base import LogitDistiller, register_distiller


def bkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the student's logits against softmax(teacher), averaged over batch and classes."""
    return F.binary_cross_entropy_with_logits(student_logits, teacher_logits.softmax(dim=-1))


@register_distiller("bkd")
class BKD(LogitDistiller):
    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        return bkd_loss(student_logits, teacher_logits)
