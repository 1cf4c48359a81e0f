"""One stage feature seen as a 2-D grid, whatever the family: (B, C, H, W) maps and (B, L, C) token sequences.

A sequence loses its prefix (class, register, distillation) tokens, which timm puts first, and its remaining
tokens are laid out row-major on the grid whose aspect ratio is the input image's. This lets a distiller treat
CNN, ViT, Swin and MLP stages alike, on any input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from pat_hf.modules.shapes import Shape, is_map


def token_grid(num_tokens: int, input_size: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of `num_tokens` patch tokens from an image of `input_size` (C, H, W)."""
    height, width = input_size[-2:]
    rows = max(1, round(math.sqrt(num_tokens * height / width)))
    columns = num_tokens // rows
    if rows * columns != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid with the {height}x{width} input's aspect ratio")
    return rows, columns


@dataclass(frozen=True)
class FeatureGrid:
    """Layout of one stage feature: its channels, its grid and how to get a (B, C, H, W) map from it."""

    channels: int
    height: int
    width: int
    is_sequence: bool
    num_prefix_tokens: int = 0

    @classmethod
    def of(cls, shape: Shape, input_size: tuple[int, ...], num_prefix_tokens: int = 0) -> FeatureGrid:
        """`shape`: the per-sample stage shape from `StageLayer` ((C, H, W) or (L, C), prefix tokens included)."""
        if is_map(shape):
            return cls(shape[0], shape[1], shape[2], is_sequence=False)
        rows, columns = token_grid(shape[0] - num_prefix_tokens, input_size)
        return cls(shape[1], rows, columns, is_sequence=True, num_prefix_tokens=num_prefix_tokens)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) without prefix tokens."""
        if not self.is_sequence:
            return x
        return rearrange(x[:, self.num_prefix_tokens:], "b (h w) c -> b c h w", h=self.height)
