"""ReviewKD's hierarchical context loss, as PAT uses it for feature distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOL_LEVELS = (4, 2, 1)


def hierarchical_context_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE at full resolution plus MSE of 4x4, 2x2, 1x1 average pools (weights 1/2, 1/4, 1/8), normalised.

    Both are (B, C, H, W) maps; a level is used when it is finer than the smaller side. Pooling is linear, so
    each level's MSE is the mean square of the pooled difference; a level whose bins are equal makes the coarser
    levels means of its own pools, so only one pool reads the full-size map (and only one full-size gradient
    comes back through pooling)."""
    difference = student - teacher
    loss = difference.square().mean()
    weight, total = 1.0, 1.0
    source = difference
    for level in POOL_LEVELS:
        if level >= min(student.shape[-2:]):
            continue
        weight /= 2
        pooled = F.adaptive_avg_pool2d(source, level)
        if all(size % level == 0 for size in source.shape[-2:]):
            source = pooled
        loss = loss + weight * pooled.square().mean()
        total += weight
    return loss / total
