"""Swin-style patch merging on (B, H, W, C) grids: each 2x2 block becomes one token of width `out_dim`.

The four neighbours are concatenated in the order (0,0), (1,0), (0,1), (1,1) (row offset fastest), as in Swin
and the reference OFA heads, then LayerNorm, a bias-free Linear and an optional activation. Odd sides are
zero-padded at the bottom/right, so any grid can be merged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int, activation: type[nn.Module] = nn.Identity):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = rearrange(x, "b (h p1) (w p2) c -> b h w (p2 p1 c)", p1=2, p2=2)
        return self.act(self.reduction(self.norm(x)))
