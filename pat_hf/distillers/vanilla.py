"""Vanilla: the student trained on labels alone (the teacher, if any, is ignored)."""

from __future__ import annotations

import torch

from pat_hf.distillers.base import Distiller, register_distiller


@register_distiller("vanilla")
class Vanilla(Distiller):
    requires_teacher = False

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, **batch):
        logits = self.student(images)
        return logits, {"loss_gt": self.gt_loss(logits, labels)}
