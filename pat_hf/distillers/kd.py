"""KD (Hinton et al.): cross-entropy plus the temperature-scaled KL divergence to the teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pat_hf.distillers.base import LogitDistiller, register_distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


@register_distiller("kd")
class KD(LogitDistiller):
    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.common.kd_temperature)
