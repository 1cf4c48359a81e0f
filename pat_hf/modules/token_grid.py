"""One stage feature seen as a 2-D grid, whatever the family: (B, C, H, W) maps and (B, L, C) token sequences.

Shapes are per sample, as `StageLayer` reports them: (C, H, W) for maps, (L, C) for sequences with the prefix
(class, register, distillation) tokens included. A sequence sets its prefix tokens aside, which timm puts
first, and lays the remaining tokens row-major on the grid whose aspect ratio is the input image's. This lets a
distiller treat CNN, ViT, Swin and MLP stages alike, on any input size.

The published PAT code lays sequences out differently (docs/REFERENCE.md, Quirks): a sequence whose length is
not a perfect square sets its *last* token aside as the class token, and the rest must form a square grid.
`last_token_as_class=True` reproduces that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

Shape = tuple[int, ...]


def is_map(shape: Shape) -> bool:
    return len(shape) == 3


def channels(shape: Shape) -> int:
    return shape[0] if is_map(shape) else shape[-1]


def is_square(num_tokens: int) -> bool:
    return math.isqrt(num_tokens) ** 2 == num_tokens


def token_grid(num_tokens: int, input_size: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of `num_tokens` patch tokens from an image of `input_size` (C, H, W)."""
    height, width = input_size[-2:]
    rows = max(1, round(math.sqrt(num_tokens * height / width)))
    columns = num_tokens // rows
    if rows * columns != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid with the {height}x{width} input's aspect ratio")
    return rows, columns


def _reference_square_side(num_tokens: int) -> int:
    """Side of the reference's square grid: all tokens if they form a square, else all but the last."""
    grid_tokens = num_tokens if is_square(num_tokens) else num_tokens - 1
    if not is_square(grid_tokens):
        raise ValueError(f"{num_tokens} tokens do not form a square grid, with or without their last token, as the "
                         "reference's layout needs; use --pat-mode corrected for non-square token grids")
    return math.isqrt(grid_tokens)


@dataclass(frozen=True)
class FeatureGrid:
    """Layout of one stage feature: its channels, its grid and how its tokens lie on that grid."""

    channels: int
    height: int
    width: int
    is_sequence: bool
    num_prefix_tokens: int = 0
    last_token_as_class: bool = False

    @classmethod
    def of(cls, shape: Shape, input_size: tuple[int, ...], num_prefix_tokens: int = 0, *,
           last_token_as_class: bool = False) -> FeatureGrid:
        """`shape`: the per-sample stage shape ((C, H, W) or (L, C), prefix tokens included)."""
        if is_map(shape):
            return cls(shape[0], shape[1], shape[2], is_sequence=False)
        if last_token_as_class:
            side = _reference_square_side(shape[0])
            return cls(shape[1], side, side, is_sequence=True, last_token_as_class=True)
        rows, columns = token_grid(shape[0] - num_prefix_tokens, input_size)
        return cls(shape[1], rows, columns, is_sequence=True, num_prefix_tokens=num_prefix_tokens)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def grid_shape(self) -> Shape:
        """The per-sample shape of the feature without its set-aside tokens."""
        if not self.is_sequence:
            return self.channels, self.height, self.width
        return self.height * self.width, self.channels

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens on the grid, tokens set aside) of a (B, L, C) sequence."""
        if self.last_token_as_class:
            # Decided on the length at hand, as the reference does, so a sequence already split passes unchanged.
            return (x, x[:, :0]) if is_square(x.shape[1]) else (x[:, :-1], x[:, -1:])
        return x[:, self.num_prefix_tokens:], x[:, :self.num_prefix_tokens]

    def join(self, grid_tokens: torch.Tensor, aside: torch.Tensor) -> torch.Tensor:
        """The inverse of `split`: the set-aside tokens go back where they came from."""
        pieces = [grid_tokens, aside] if self.last_token_as_class else [aside, grid_tokens]
        return torch.cat(pieces, dim=1)

    def grid_part(self, x: torch.Tensor) -> torch.Tensor:
        """A stage feature without its set-aside tokens (maps as they are)."""
        return self.split(x)[0] if self.is_sequence else x

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) of a stage feature, set-aside tokens dropped."""
        return self.grid_to_map(self.grid_part(x))

    def grid_to_map(self, grid_tokens: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) of tokens that are already the grid's alone (maps pass through)."""
        if grid_tokens.ndim == 4:
            return grid_tokens
        return rearrange(grid_tokens, "b (h w) c -> b c h w", h=self.height)
