"""Vanilla: the student trained on labels alone (the teacher, if any, is ignored); unlabelled examples
(--label-fraction, --allow-unlabelled) teach it nothing."""

from __future__ import annotations

import torch

from pat_hf.distillers.base import Distiller, register_distiller


@register_distiller("vanilla")
class Vanilla(Distiller):
    supports_unlabelled = True
    requires_teacher = False

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None,
                      **batch: torch.Tensor):
        logits = self.student(images)
        return logits, {"loss_gt": self.gt_loss(logits, labels, labelled)}
