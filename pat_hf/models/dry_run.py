"""One forward of zeros in evaluation mode: how a model is checked to run at a size, and how the stage layer
records its tensors without touching BatchNorm's running statistics."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def dry_run(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1) -> None:
    """Run `model` on `batch_size` zero images of `input_size` (C, H, W) in evaluation mode, then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        model(torch.zeros(batch_size, *input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
