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

from pat_hf.modules.token_grid import Shape, channels, is_map


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


def _square_side(num_tokens: int) -> int:
    # Tokens meet maps here only at region attention's outputs, which lie on a square grid.
    return math.isqrt(num_tokens)


class MapToMap(nn.Module):
    """Nearest resize to the target's height and width, BatchNorm, 1x1 conv."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        self.out_size = tuple(out_shape[-2:])
        self.proj = nn.Sequential(nn.BatchNorm2d(channels(in_shape)),
                                  nn.Conv2d(channels(in_shape), channels(out_shape), 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="nearest")
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
        return super().forward(rearrange(x, "b (h w) c -> b c h w", h=_square_side(x.shape[1])))


class MapToTokens(nn.Module):
    """Nearest upsample if needed, then a patch-embedding conv onto the target token grid."""

    def __init__(self, in_shape: Shape, out_shape: Shape):
        super().__init__()
        grid = _square_side(out_shape[0])
        patch = tuple(math.ceil(size / grid) for size in in_shape[-2:])
        self.in_size = tuple(p * grid for p in patch)
        self.proj = nn.Conv2d(channels(in_shape), channels(out_shape), patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.in_size:
            x = F.interpolate(x, size=self.in_size, mode="nearest")
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


def build_projector(in_shape: Shape, out_shape: Shape) -> nn.Module:
    kinds = {(True, True): MapToMap, (False, False): TokensToTokens,
             (False, True): TokensToMap, (True, False): MapToTokens}
    projector = kinds[is_map(in_shape), is_map(out_shape)](in_shape, out_shape)
    init_weights(projector)
    return projector
