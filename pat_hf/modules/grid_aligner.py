"""A learned map from one feature grid onto another of a different width and resolution (FitNet's aligner).

Each output cell is a linear function of the input cells it covers, so the aligner is the reference FitNet's
projector family expressed once for every pair of layouts:
  * same grid: a 1x1 conv (the reference's CNN->CNN conv and its token-wise Linear);
  * finer input: a patch-embedding conv whose kernel and stride are the resolution ratio (the reference's
    PatchEmbed, and its MyPatchMerging + Linear / 1x1 conv);
  * coarser input: a 1x1 conv to ratio^2 * C_out channels, each input cell unfolded into its ratio x ratio
    output cells (the reference's Linear + Unpatchify). For sequence->sequence the reference reshaped the
    widened tokens into consecutive tokens instead, which scatters one cell's outputs along a grid row; the
    unfolding keeps them on their spatial block;
  * grids that are not integer multiples of each other (Inception's 20x20 against 6x6, or finer along one axis
    and coarser along the other), which the reference never aligned: the input is first average-pooled onto
    the output grid (adaptive pooling: each output cell averages the input cells it overlaps), then a 1x1 conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def grids_are_multiples(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether one grid is an integer multiple of the other along both axes, in the same direction."""
    if all(i >= o for i, o in zip(in_size, out_size)):
        return all(i % o == 0 for i, o in zip(in_size, out_size))
    if all(i <= o for i, o in zip(in_size, out_size)):
        return all(o % i == 0 for i, o in zip(in_size, out_size))
    return False


class GridAligner(nn.Module):
    def __init__(self, in_channels: int, in_size: tuple[int, int], out_channels: int, out_size: tuple[int, int],
                 *, bias: bool = True):
        super().__init__()
        self.pool_to = None if grids_are_multiples(in_size, out_size) else tuple(out_size)
        if self.pool_to is not None:
            in_size = out_size
        self.unfold = tuple(max(o // i, 1) for i, o in zip(in_size, out_size))
        kernel = tuple(max(i // o, 1) for i, o in zip(in_size, out_size))
        self.proj = nn.Conv2d(in_channels, out_channels * self.unfold[0] * self.unfold[1], kernel, stride=kernel,
                              bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_to is not None:
            x = F.adaptive_avg_pool2d(x, self.pool_to)
        x = self.proj(x)
        if self.unfold == (1, 1):
            return x
        return rearrange(x, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=self.unfold[0], p2=self.unfold[1])
