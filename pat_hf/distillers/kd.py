"""KD (Hinton et al.): cross-entropy plus the temperature-scaled KL divergence to the teacher's logits."""

from __future__ import annotations

import torch

from pat_hf.distillers.base import LogitDistiller, kd_loss, register_distiller


@register_distiller("kd")
class KD(LogitDistiller):
    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.common.kd_temperature)
