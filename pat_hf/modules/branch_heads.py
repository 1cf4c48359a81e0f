"""OFA's branch classifiers: a small network that turns one intermediate student stage into class logits.

Feature maps go through stride-2 depthwise-separable blocks (one per stage left below them) that widen to the
head width, then global average pooling and a Linear. Token grids are merged 2x2 down to the resolution a
last stage would have, go through a few transformer blocks, are averaged and classified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from pat_hf.modules.patch_merging import PatchMerging


class SeparableDownsample(nn.Module):
    """Halve the resolution with two depthwise-separable 3x3 convs (the first strided), each with BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.downsample_dw = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels,
                                       bias=False)
        self.downsample_pw = nn.Conv2d(in_channels, in_channels, 1, bias=False)
        self.downsample_bn = nn.BatchNorm2d(in_channels)
        self.mix_dw = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.mix_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.mix_bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.downsample_bn(self.downsample_pw(self.downsample_dw(x))))
        return F.relu(self.mix_bn(self.mix_pw(self.mix_dw(x))))


class MapBranchHead(nn.Module):
    """(B, C, H, W) -> logits. `num_downsamples` separable blocks doubling the width (the last one reaching
    `width`), or a 1x1 conv to `width` when there is nothing to downsample."""

    def __init__(self, in_channels: int, num_downsamples: int, width: int, num_classes: int):
        super().__init__()
        if num_downsamples == 0:
            self.features = nn.Sequential(nn.Conv2d(in_channels, width, 1))
        else:
            widths = [in_channels * 2**i for i in range(num_downsamples)] + [width]
            self.features = nn.Sequential(*(SeparableDownsample(widths[i], widths[i + 1])
                                            for i in range(num_downsamples)))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class TokenBranchHead(nn.Module):
    """(B, C, H, W) grid of tokens -> logits: `num_merges` 2x2 patch mergings to `width` (GELU after all but
    the last, and always after the first), `num_blocks` ViT blocks of `width`, token mean, Linear."""

    def __init__(self, in_channels: int, num_merges: int, num_blocks: int, width: int, num_classes: int,
                 num_heads: int = 4):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"an OFA token head of width {width} cannot have {num_heads} attention heads")
        merges = [PatchMerging(in_channels if i == 0 else width, width,
                               nn.GELU if i == 0 or i < num_merges - 1 else nn.Identity)
                  for i in range(num_merges)]
        # Without a merge to change the width, a projection keeps the blocks at the head width.
        if not merges and in_channels != width:
            merges = [nn.Linear(in_channels, width)]
        self.downsample = nn.Sequential(*merges)
        self.blocks = nn.Sequential(*(Block(dim=width, num_heads=num_heads) for _ in range(num_blocks)))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(rearrange(x, "b c h w -> b h w c"))
        x = self.blocks(rearrange(x, "b h w c -> b (h w) c"))
        return self.classifier(x.mean(dim=1))
