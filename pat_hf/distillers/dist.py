"""DIST (Huang et al. 2022): match the teacher's predictions by Pearson correlation, across classes for each
sample (inter-class) and across samples for each class (intra-class)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pat_hf.distillers.base import LogitDistiller, register_distiller

PEARSON_EPS = 1e-8


@dataclass
class DISTArguments:
    dist_beta: float = field(default=1.0, metadata={"help": "weight of the inter-class relation"})
    dist_gamma: float = field(default=1.0, metadata={"help": "weight of the intra-class relation"})
    dist_tau: float = field(default=1.0, metadata={"help": "softmax temperature"})


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Row-wise Pearson correlation: the cosine of the mean-centred rows, eps added to the norm product."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0) -> torch.Tensor:
    """tau^2 * (beta * (1 - mean row correlation) + gamma * (1 - mean column correlation)) of softmax(z / tau)."""
    y_s = (student_logits / tau).softmax(dim=1)
    y_t = (teacher_logits / tau).softmax(dim=1)
    inter = 1 - pearson_correlation(y_s, y_t).mean()
    intra = 1 - pearson_correlation(y_s.t(), y_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


@register_distiller("dist")
class DIST(LogitDistiller):
    Arguments = DISTArguments

    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return dist_loss(student_logits, teacher_logits, hp.dist_beta, hp.dist_gamma, hp.dist_tau)
