"""DKD (Decoupled KD, Zhao et al. 2022): KD split into a target-class term and a non-target-class term.

The reference reads hyper-parameters that do not exist and crashes on its first step (docs/REFERENCE.md,
Distillers); this is the formula it evidently meant, with `--dkd-alpha/--dkd-beta/--dkd-temperature`.

The target class splits both terms; for an unlabelled example (--label-fraction, --allow-unlabelled) it is the
teacher's predicted class (`LogitDistiller`), so TCKD and NCKD still train on it (docs/REFERENCE.md, Few labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pat_hf.distillers.base import LogitDistiller, hard_labels, register_distiller

# Subtracted from the target logit to take the target class out of the non-target distribution.
TARGET_LOGIT_OFFSET = 1000.0


@dataclass
class DKDArguments:
    dkd_alpha: float = field(default=1.0, metadata={"help": "weight of the target-class term (TCKD)"})
    dkd_beta: float = field(default=2.0, metadata={"help": "weight of the non-target-class term (NCKD)"})
    dkd_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both terms"})


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float,
             beta: float, temperature: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD, each T^2 * KL(teacher || student), batch mean.

    TCKD compares the binary (target, rest) probabilities; NCKD the distributions over the non-target classes."""
    gt_mask = F.one_hot(target, student_logits.shape[-1]).to(student_logits.dtype)
    p_student = F.softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)

    def binary(p: torch.Tensor) -> torch.Tensor:
        target_p = (p * gt_mask).sum(dim=-1, keepdim=True)
        return torch.cat([target_p, (p * (1 - gt_mask)).sum(dim=-1, keepdim=True)], dim=-1)

    tckd = F.kl_div(binary(p_student).log(), binary(p_teacher), reduction="batchmean")
    offset = TARGET_LOGIT_OFFSET * gt_mask
    nckd = F.kl_div(F.log_softmax(student_logits / temperature - offset, dim=-1),
                    F.softmax(teacher_logits / temperature - offset, dim=-1), reduction="batchmean")
    return (alpha * tckd + beta * nckd) * temperature**2


@register_distiller("dkd")
class DKD(LogitDistiller):
    Arguments = DKDArguments

    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return dkd_loss(student_logits, teacher_logits, hard_labels(labels), hp.dkd_alpha, hp.dkd_beta,
                        hp.dkd_temperature)
