"""RKD (Relational KD, Park et al. 2019): match the teacher's pairwise distances and triplet angles between the
pooled features of a batch (docs/REFERENCE.md, Distillers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pat_hf.distillers.base import Distiller, register_distiller


@dataclass
class RKDArguments:
    rkd_distance_weight: float = field(default=25.0, metadata={"help": "weight of the distance term"})
    rkd_angle_weight: float = field(default=50.0, metadata={"help": "weight of the angle term"})
    rkd_eps: float = field(default=1e-12, metadata={"help": "lower clamp of the squared pairwise distances"})
    rkd_squared: bool = field(default=False, metadata={"help": "use squared distances"})


def pairwise_distances(x: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """(B, B) Euclidean distances between rows, with the squares clamped at eps and a zero diagonal."""
    sq_norm = x.pow(2).sum(dim=1)
    distances = (sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0) - 2 * x @ x.t()).clamp(min=eps)
    if not squared:
        distances = distances.sqrt()
    return distances * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, squared: bool = False,
                      eps: float = 1e-12) -> torch.Tensor:
    """Smooth-L1 between the distance matrices, each divided by the mean of its positive entries."""
    def normalised(x: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(x, squared, eps)
        # The mean of the positive entries as sum / count (d >= 0): masking them out would give a tensor of
        # data-dependent size, which breaks a torch.compile graph.
        return d / (d.sum() / (d > 0).sum())

    return F.smooth_l1_loss(normalised(student), normalised(teacher))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the cosines of the angles (x_j - x_i, x_k - x_i) over all B^3 triplets."""
    def angles(x: torch.Tensor) -> torch.Tensor:
        differences = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
        return torch.bmm(differences, differences.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(angles(student), angles(teacher))


@register_distiller("rkd")
class RKD(Distiller):
    supports_unlabelled = True
    Arguments = RKDArguments
    requires_stages = True

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor | None = None,
                      **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if images.shape[0] < 2:
            raise ValueError("--distiller rkd relates the samples of a batch; it needs batches of at least 2")
        student = self.student_stages(images)
        teacher = self.teacher_features(images)
        hp = self.hparams
        s, t = student.pooled.flatten(1), teacher.pooled.flatten(1)
        relation = (hp.rkd_distance_weight * rkd_distance_loss(s, t, hp.rkd_squared, hp.rkd_eps)
                    + hp.rkd_angle_weight * rkd_angle_loss(s, t))
        return student.logits, {
            "loss_gt": self.gt_loss(student.logits, labels, labelled),
            "loss_kd": self.common.kd_loss_weight * relation,
        }
