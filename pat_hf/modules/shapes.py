"""Per-sample feature shapes: (C, H, W) for feature maps, (L, C) for token sequences."""

from __future__ import annotations

import math

import torch

Shape = tuple[int, ...]


def is_map(shape: Shape) -> bool:
    return len(shape) == 3


def channels(shape: Shape) -> int:
    return shape[0] if is_map(shape) else shape[-1]


def side(shape: Shape) -> int:
    """Spatial side of a square map, or of the square grid a token count is laid out on (rounded down)."""
    return shape[-1] if is_map(shape) else math.isqrt(shape[0])


def is_square(num_tokens: int) -> bool:
    return math.isqrt(num_tokens) ** 2 == num_tokens


def split_grid_tokens(x: torch.Tensor, *, faithful: bool, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens on the square grid, tokens set aside) of a (B, L, C) sequence.

    The reference (`faithful`) sets aside the *last* token of a non-square sequence, taking it for the class
    token (SPEC §6.2); the corrected behaviour sets aside the model's prefix tokens, which timm puts first.
    """
    if faithful:
        return (x, x[:, :0]) if is_square(x.shape[1]) else (x[:, :-1], x[:, -1:])
    return x[:, num_prefix_tokens:], x[:, :num_prefix_tokens]


def grid_token_count(num_tokens: int, *, faithful: bool, num_prefix_tokens: int) -> int:
    if faithful:
        return num_tokens if is_square(num_tokens) else num_tokens - 1
    return num_tokens - num_prefix_tokens
