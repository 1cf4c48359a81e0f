"""A map onto a square grid of tokens with a non-overlapping patch-embedding convolution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Patches of at least this many pixels run as one matmul over the flattened patches: the same sums as the
# convolution, and faster on CPUs, where oneDNN's large-stride convolution is slow (README.md, Performance).
MATMUL_PATCH_AREA = 64


class PatchTokens(nn.Conv2d):
    """(B, C, H, W) of `map_size` -> (B, side * side, C_out): nearest-resized up to a multiple of `side` if
    needed, then a stride-p p x p convolution (a Conv2d's weights and names)."""

    def __init__(self, in_channels: int, out_channels: int, map_size: tuple[int, int], side: int):
        patch = tuple(math.ceil(size / side) for size in map_size)
        super().__init__(in_channels, out_channels, patch, stride=patch)
        self.in_size = tuple(p * side for p in patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.in_size:
            x = F.interpolate(x, size=self.in_size, mode="nearest")
        p1, p2 = self.kernel_size
        if math.prod(self.kernel_size) < MATMUL_PATCH_AREA:
            return rearrange(super().forward(x), "b c h w -> b (h w) c")
        patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p1, p2=p2)
        return F.linear(patches, self.weight.flatten(1), self.bias)
