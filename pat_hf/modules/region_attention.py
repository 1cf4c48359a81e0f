"""PAT's region-aware attention (RAA): self-attention over a few patch tokens from each student stage.

Every student stage is patch-embedded onto a small square grid of tokens (n = num_queries / 4 per stage); the
4n tokens attend to each other (queries, keys and values all from the student, no residual, no output
projection) and come back split by stage. `faithful=True` reproduces the reference's positional encoding,
which is indexed by the sample's position in the batch (SPEC §6.3), and its choice of the *last* token as
the one to drop from a non-square sequence (§6.2); `faithful=False` indexes the encoding by token and drops
the model's prefix tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pat_hf.modules.shapes import Shape, channels, is_map, side, split_grid_tokens

NUM_STAGES = 4


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, 1, dim): sin at even, cos at odd channels."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.unsqueeze(1)


class StagePatchEmbed(nn.Module):
    """One student stage onto a grid x grid token layout with a patch-embedding conv."""

    def __init__(self, shape: Shape, grid: int, dim: int, *, faithful: bool, num_prefix_tokens: int = 0):
        super().__init__()
        self.faithful = faithful
        self.num_prefix_tokens = num_prefix_tokens
        patch = math.ceil(side(shape) / grid)
        self.in_side = patch * grid
        self.proj = nn.Conv2d(channels(shape), dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = split_grid_tokens(x, faithful=self.faithful, num_prefix_tokens=self.num_prefix_tokens)[0]
            x = rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))
        if x.shape[-1] < self.in_side:
            x = F.interpolate(x, size=(self.in_side, self.in_side), mode="nearest")
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


class RegionAttention(nn.Module):
    def __init__(self, stage_shapes: list[Shape], *, num_queries: int = 64, dim: int = 512, heads: int = 8,
                 faithful: bool, num_prefix_tokens: int = 0):
        super().__init__()
        tokens_per_stage = num_queries // NUM_STAGES
        grid = math.isqrt(tokens_per_stage)
        if num_queries % NUM_STAGES or grid * grid != tokens_per_stage:
            raise ValueError(f"--pat-raa-num-queries must be 4*k*k (16, 36, 64, 100, 144, ...), got {num_queries}")
        if dim % heads or dim % 2:
            raise ValueError(f"--pat-raa-dim must be even and divisible by {heads} heads, got {dim}")
        self.faithful = faithful
        self.heads = heads
        self.tokens_per_stage = tokens_per_stage
        self.projectors = nn.ModuleList(
            StagePatchEmbed(shape, grid, dim, faithful=faithful,
                            num_prefix_tokens=0 if is_map(shape) else num_prefix_tokens)
            for shape in stage_shapes)
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.register_buffer("positional_encoding", sinusoidal_table(5000, dim))

    @property
    def token_shape(self) -> Shape:
        return (self.tokens_per_stage, self.norm.normalized_shape[0])

    def forward(self, stage_features: list[torch.Tensor]) -> list[torch.Tensor]:
        tokens = self.norm(torch.cat([proj(f) for proj, f in zip(self.projectors, stage_features)], dim=1))
        q = self.to_q(tokens)
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        if self.faithful:
            position = self.positional_encoding[: tokens.shape[0]]  # (B, 1, dim): one vector per sample
        else:
            position = rearrange(self.positional_encoding[: tokens.shape[1]], "n 1 d -> 1 n d")
        q, k = q + position, k + position
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        out = rearrange(attention @ v, "b h n d -> b n (h d)")
        return list(out.split(self.tokens_per_stage, dim=1))
