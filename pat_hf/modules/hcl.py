"""ReviewKD's hierarchical context loss, as PAT uses it for feature distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOL_LEVELS = (4, 2, 1)


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE at full resolution plus MSE of 4x4, 2x2, 1x1 average pools (weights 1/2, 1/4, 1/8), normalised.

    Both are (B, C, H, W) maps; a level is used when it is finer than the smaller side."""
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in POOL_LEVELS:
        if level >= min(student.shape[-2:]):
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level))
        total += weight
    return loss / total
