"""Projectors between feature shapes of different families (the reference's `get_projector_module`).

Four kinds, chosen by the two shapes: map -> map, tokens -> tokens, tokens -> map and map -> tokens.
Weights are initialised as the reference's `init_weights` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pat_hf.modules.shapes import Shape, channels, is_map, side


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero norms, truncated-normal(0.02) linears, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MapToMap(nn.Module):
    """Nearest resize to the target side, BatchNorm, 1x1 conv."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        self.out_side = side(out_shape)
        self.proj = nn.Sequential(nn.BatchNorm2d(channels(in_shape)),
                                  nn.Conv2d(channels(in_shape), channels(out_shape), 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.out_side:
            x = F.interpolate(x, size=(self.out_side, self.out_side), mode="nearest")
        return self.proj(x)


class TokensToTokens(nn.Module):
    """A learned channel projection followed by a learned token-count projection."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        (in_tokens, in_dim), (out_tokens, out_dim) = in_shape, out_shape
        self.channel_proj = nn.Sequential(nn.BatchNorm1d(in_tokens), nn.Linear(in_dim, out_dim))
        self.token_proj = nn.Sequential(nn.BatchNorm1d(out_dim), nn.Linear(in_tokens, out_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_proj(x)
        x = self.token_proj(rearrange(x, "b l c -> b c l"))
        return rearrange(x, "b c l -> b l c")


class TokensToMap(MapToMap):
    """Tokens laid out on their square grid, then as MapToMap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1])))


class MapToTokens(nn.Module):
    """Nearest upsample if needed, then a patch-embedding conv onto the target token grid."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        grid = side(out_shape)
        self.patch = math.ceil(side(in_shape) / grid)
        self.in_side = self.patch * grid
        self.proj = nn.Conv2d(channels(in_shape), channels(out_shape), self.patch, stride=self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.in_side:
            x = F.interpolate(x, size=(self.in_side, self.in_side), mode="nearest")
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


def build_projector(in_shape: Shape, out_shape: Shape) -> nn.Module:
    kinds = {(True, True): MapToMap, (False, False): TokensToTokens,
             (False, True): TokensToMap, (True, False): MapToTokens}
    projector = kinds[is_map(in_shape), is_map(out_shape)](in_shape, out_shape)
    init_weights(projector)
    return projector
