"""A learned map from one feature grid onto another of a different width and resolution (FitNet's aligner).

Each output cell is a linear function of the input cells it covers, so the aligner is the reference FitNet's
projector family expressed once for every pair of layouts:
  * same grid: a 1x1 conv (the reference's CNN->CNN conv and its token-wise Linear);
  * finer input: a patch-embedding conv whose kernel and stride are the resolution ratio (the reference's
    PatchEmbed, and its MyPatchMerging + Linear / 1x1 conv);
  * coarser input: a 1x1 conv to ratio^2 * C_out channels, each input cell unfolded into its ratio x ratio
    output cells (the reference's Linear + Unpatchify). For sequence->sequence the reference reshaped the
    widened tokens into consecutive tokens instead, which scatters one cell's outputs along a grid row; the
    unfolding keeps them on their spatial block.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def _ratio(larger: int, smaller: int, what: str) -> int:
    if larger % smaller:
        raise ValueError(f"{what}: a {larger}-cell side is not a multiple of a {smaller}-cell side")
    return larger // smaller


class GridAligner(nn.Module):
    def __init__(self, in_channels: int, in_size: tuple[int, int], out_channels: int, out_size: tuple[int, int],
                 *, bias: bool = True):
        super().__init__()
        finer = [i > o for i, o in zip(in_size, out_size)]
        coarser = [i < o for i, o in zip(in_size, out_size)]
        if any(finer) and any(coarser):
            raise ValueError(f"cannot align a {in_size[0]}x{in_size[1]} grid onto {out_size[0]}x{out_size[1]}: "
                             "finer along one axis and coarser along the other")
        what = f"aligning a {in_size[0]}x{in_size[1]} grid onto {out_size[0]}x{out_size[1]}"
        if any(finer):
            kernel = tuple(_ratio(i, o, what) for i, o in zip(in_size, out_size))
            self.unfold = (1, 1)
            self.proj = nn.Conv2d(in_channels, out_channels, kernel, stride=kernel, bias=bias)
        else:
            self.unfold = tuple(_ratio(o, i, what) for i, o in zip(in_size, out_size))
            self.proj = nn.Conv2d(in_channels, out_channels * self.unfold[0] * self.unfold[1], 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.unfold == (1, 1):
            return x
        return rearrange(x, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=self.unfold[0], p2=self.unfold[1])
