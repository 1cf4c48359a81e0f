"""Correlation congruence as the reference implements it: the absolute differences between linear embeddings
of the student's and the teacher's pooled features, multiplied between consecutive samples of the batch
(docs/REFERENCE.md, Distillers). Both embeddings are trained, the teacher's included."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pat_hf.distillers.base import DistillArguments, DistillContext, Distiller, register_distiller


@dataclass
class CorrelationArguments:
    correlation_scale: float = field(default=0.02, metadata={"help": "scale of the correlation term"})
    correlation_feat_dim: int = field(default=128, metadata={"help": "width of the two embeddings"})


def correlation_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor) -> torch.Tensor:
    """mean_i sum_d |e_s - e_t|_{i,d} * |e_s - e_t|_{i+1,d} over consecutive pairs of the batch."""
    delta = (student_embed - teacher_embed).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register_distiller("correlation")
class Correlation(Distiller):
    supports_unlabelled = True
    reference_renames = (
        (r"^embed_s\.linear\.", "embed_student."),
        (r"^embed_t\.linear\.", "embed_teacher."),
    )
    reference_module_names = {"embed_student": "embed_s", "embed_teacher": "embed_t"}
    Arguments = CorrelationArguments
    requires_stages = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, common: DistillArguments,
                 hparams: CorrelationArguments, context: DistillContext):
        super().__init__(student, teacher, common, hparams, context)
        self.embed_student = nn.Linear(self.student_stages.pooled_dim, hparams.correlation_feat_dim)
        self.embed_teacher = nn.Linear(self.teacher_stages.pooled_dim, hparams.correlation_feat_dim)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if images.shape[0] < 2:
            raise ValueError("--distiller correlation pairs consecutive samples; it needs batches of at least 2")
        student = self.student_stages(images)
        teacher = self.teacher_features(images)
        congruence = correlation_loss(self.embed_student(student.pooled.flatten(1)),
                                      self.embed_teacher(teacher.pooled.flatten(1)))
        return student.logits, {
            "loss_gt": self.gt_loss(student.logits, labels, labelled),
            "loss_kd": self.common.kd_loss_weight * self.hparams.correlation_scale * congruence,
        }
