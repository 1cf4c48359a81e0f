"""ReviewKD's hierarchical context loss, as PAT uses it for feature distillation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

POOL_LEVELS = (4, 2, 1)


def as_map(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1])) if x.ndim == 3 else x


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE at full resolution plus MSE of 4x4, 2x2, 1x1 average pools (weights 1/2, 1/4, 1/8), normalised."""
    student, teacher = as_map(student), as_map(teacher)
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in POOL_LEVELS:
        if level >= student.shape[-1]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level))
        total += weight
    return loss / total
