"""KD (Hinton et al.): cross-entropy plus the temperature-scaled KL divergence to the teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pat_hf.distillers.base import Distiller, register_distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


@register_distiller("kd")
class KD(Distiller):
    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, **batch):
        logits = self.student(images)
        teacher_logits = self.teacher_logits(images)
        return logits, {
            "loss_gt": self.gt_loss(logits, labels),
            "loss_kd": self.common.kd_loss_weight * kd_loss(logits, teacher_logits, self.common.kd_temperature),
        }
